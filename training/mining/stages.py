"""The sample and score stages of the mining job: Ray Data callable classes (`map_batches`).

Each stage takes rows (paths and small fields), calls the sampler or the scorer, and returns the
rows with more fields; a failure becomes status "failed" with a reason, never an exception that
stops the job. Who answers the call is the only difference between the two modes:
    - Serve mode: the running app's `Sampler` / `Scorer` deployments, through handles by name.
      Serve's queue limits push back on the stream: a call waits and retries on back-pressure.
    - `--local`: the same engines the deployments hold (`common.sampling.Sampler`,
      `common.scorer.Scorer`), one per actor of the stage's pool, loaded once.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from common.errors import ConfigError
from common.sampling import SampleRequest, SamplingConfig
from common.scorer import ScorerConfig
from training.mining.config import MineConfig
from training.mining.records import records_table

#: The MineConfig fields a sample request takes (None: the sampler's default).
REQUEST_KEYS = ("steps", "guidance", "frames", "height", "width", "negative_prompt", "adapter")


def sample_request(row: dict, config: MineConfig) -> SampleRequest:
    given = {key: getattr(config, key) for key in REQUEST_KEYS if getattr(config, key) is not None}
    return SampleRequest(prompt=row["prompt"], seeds=[int(row["seed"])], **given)


def call_with_backpressure(call: Callable[[], Any], timeout_s: float):
    """Call a deployment handle; while Serve answers with back-pressure, wait and try again."""
    from ray.serve.exceptions import BackPressureError

    end, delay = time.monotonic() + timeout_s, 0.2
    while True:
        try:
            return call()
        except BackPressureError:
            if time.monotonic() > end:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def deployment_call(deployment: str, method: str, app_name: str, timeout_s: float) -> Callable[..., Any]:
    """`f(*args)` = the app's `deployment.method(*args)` through a handle, waiting out back-pressure."""
    from ray import serve

    handle = getattr(serve.get_deployment_handle(deployment, app_name=app_name), method)
    return lambda *args: call_with_backpressure(lambda: handle.remote(*args).result(), timeout_s)


class _RowStage:
    """Maps each row of a batch through `_call`; its answer's result becomes record fields, its error a reason."""

    stage = ""   # "sampling" or "scoring": the reason's prefix
    timing = ""  # the record field holding the call's seconds

    def __call__(self, batch):
        return records_table([self._row(row) for row in batch.to_pylist()])

    def _row(self, row: dict) -> dict:
        if row.get("status") == "failed":  # an earlier stage failed: nothing to do
            return row
        t0 = time.perf_counter()
        try:
            answer = self._call(row)
        except Exception as err:  # noqa: BLE001 - recorded, the job goes on
            return dict(row, status="failed", reason=f"{self.stage}: {type(err).__name__}: {err}")
        out = dict(row, **{self.timing: time.perf_counter() - t0})
        if answer.error is not None:
            return dict(out, status="failed", reason=f"{self.stage}: {answer.error.type}: {answer.error.message}")
        return dict(out, **self._fields(answer.result))


class SampleStage(_RowStage):
    """Samples each row's (prompt, seed): the app's Sampler (`app_name`) or a local engine (`sampling`)."""

    stage, timing = "sampling", "sample_s"

    def __init__(self, config: MineConfig, *, app_name: Optional[str] = None, sampling: Optional[SamplingConfig] = None):
        self._config = config
        if sampling is not None:
            from common.sampling import Sampler

            self._sample = Sampler(sampling).sample
        else:
            self._sample = deployment_call("Sampler", "sample", app_name, config.backpressure_timeout_s)

    def _call(self, row: dict):
        return self._sample(sample_request(row, self._config), row.get("image"))

    @staticmethod
    def _fields(result) -> dict:
        files = result.samples[0]
        return {"status": None, "reason": None, "sample_id": result.sample_id, "video": files.video,
                "latents": files.latents, "prompt_embeds": files.prompt_embeds}


class ScoreStage(_RowStage):
    """Scores each row's video: the app's Scorer (`app_name`) or a local engine (`scoring`)."""

    stage, timing = "scoring", "score_s"

    def __init__(self, config: MineConfig, *, app_name: Optional[str] = None, scoring: Optional[ScorerConfig] = None):
        if scoring is not None:
            from common.scorer import Scorer

            self._score = Scorer(scoring).score
        else:
            self._score = deployment_call("Scorer", "score", app_name, config.backpressure_timeout_s)

    def _call(self, row: dict):
        return self._score(row["video"])

    @staticmethod
    def _fields(result) -> dict:
        return {"status": result.status, "reason": result.reason, "score": result.score, "motion": result.motion,
                "metric_id": result.metric_id}


def check_app(app_name: str, i2v: bool, family: Optional[str] = None) -> None:
    """The Serve app must be running with a sampler of the same family and kind as the model folder."""
    from ray import serve

    try:
        status = serve.status().applications.get(app_name)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot reach Ray Serve ({err}); start the app (vgpa serve) or mine with --local") from err
    if status is None:
        raise ConfigError(f"no Serve application named {app_name!r} is running; start it (vgpa serve) or mine with --local")
    deployments = set(status.deployments)
    for name in ("Sampler", "Scorer"):
        if name not in deployments:
            raise ConfigError(f"the Serve application {app_name!r} has no {name} deployment "
                              "(configure its sampler: section) ; or mine with --local")
    info = serve.get_deployment_handle("Sampler", app_name=app_name).ready.remote().result(timeout_s=600)
    from common.families import family_of_pipeline

    served = family_of_pipeline(info["pipeline"])
    if family is not None and served is not None and served.name != family:
        raise ConfigError(f"the running sampler serves a {info['pipeline']} ({served.name}), but --model is a {family} "
                          "model: mine with the model the app serves")
    app_i2v = "ImageToVideo" in info["pipeline"]
    if app_i2v != i2v:
        raise ConfigError(f"the running sampler serves a {info['pipeline']}, but --model is "
                          f"{'image' if i2v else 'text'}-to-video: mine with the model the app serves")
