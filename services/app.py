"""The application builder: config dict in, bound Serve application out.

    serve run services.app:build_app                       # defaults, scorer only
    serve run cluster/serve_config.yaml                    # import_path: services.app:build_app, args: {...}
    vgpa serve --config cluster/serve_config.yaml          # embedded local Ray

`build_app` is what a Serve config's `import_path` names; `args` is its `args:` block, validated
by `ServiceArgs` (unknown keys are errors). With no `sampler` (or no `sampler.model_dir`), the app
serves the scorer only.
"""

from __future__ import annotations

from typing import Optional

from ray.serve import Application

from services.config import ServiceArgs
from services.ingress import Ingress
from services.scorer import build_scorer


#: Requests without a body (probes, the page, /info, downloads) an ingress replica takes beside its
#: `ingress_max_ongoing_requests` body slots, so that uploads, however slow, never hold them back.
UNMETERED_INGRESS_REQUESTS = 32


def ingress_deployment_options(cfg: ServiceArgs) -> dict:
    from ray.serve.config import BackpressureConfig

    return {
        "num_replicas": cfg.ingress_replicas,
        # The body slots themselves are counted by the ingress (services.ingress: 503 when full).
        "max_ongoing_requests": cfg.ingress_max_ongoing_requests + UNMETERED_INGRESS_REQUESTS,
        "max_queued_requests": cfg.ingress_max_queued_requests,
        # The proxy answers 503 with Retry-After itself when the ingress queue is full.
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
        "ray_actor_options": {"num_cpus": 0.25},
    }


def build_app(args: Optional[dict] = None) -> Application:
    """Validate `args` as `ServiceArgs` and bind Ingress(scorer[, sampler])."""
    cfg = ServiceArgs.model_validate(args or {})
    scorer = build_scorer(cfg.scorer)
    sampler = None
    if cfg.sampler is not None:
        from services.sampler import build_sampler

        sampler = build_sampler(cfg.sampler, cfg.samples_location())
    ingress = Ingress.options(**ingress_deployment_options(cfg))
    return ingress.bind(cfg, scorer, sampler)  # validated once, here; typed objects travel to the replicas


#: The app with default settings, for `serve run services.app:app` and `serve build services.app:app`
#: (serve build needs a bound application, not a builder). Binding is cheap: nothing starts here.
app = build_app()
