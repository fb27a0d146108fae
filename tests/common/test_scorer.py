"""The scorer engine: the same score as `score_video`, request bounds from ScoreConfig, caps, backend cache, errors."""

import pytest

from common.config import ScoreConfig
from common.geometry import create_backend, register_backend, shared_backend
from common.scorer import REQUEST_FIELDS, ScoreAnswer, Scorer, ScorerConfig, ScoreRequest
from common.scoring import score_video
from common.synthetic import render_video

SMALL = ScoreConfig(frames=4, recon_frames=8, max_side=128)


@pytest.fixture(scope="module")
def clip():
    return render_video("boxes", "orbit", frames=12, size=(96, 128)).frames


def test_the_engine_gives_score_video_s_number(clip):
    """Same input, same settings: the engine adds no arithmetic of its own."""
    answer = Scorer(ScorerConfig(score=SMALL)).score(clip)
    direct = score_video(clip, SMALL)
    assert answer.error is None
    assert answer.result.model_dump(exclude={"timings_s"}) == direct.model_dump(exclude={"timings_s"})


def test_request_fields_keep_score_config_s_names_and_bounds():
    assert set(REQUEST_FIELDS) <= set(ScoreConfig.model_fields)
    assert ScoreRequest.model_validate({"lambda": "0.5", "frames": "4"}).overrides() == {"lambda_": 0.5, "frames": 4}
    for bad in ({"frames": 1}, {"frames": 257}, {"lambda": -1}, {"lambda": float("inf")}, {"max_side": 31},
                {"device": "cuda"}, {"weights": "/etc"}):
        with pytest.raises(ValueError):
            ScoreRequest.model_validate(bad)


def test_caps_and_bad_settings_are_answers_not_exceptions(clip):
    scorer = Scorer(ScorerConfig(score=SMALL, max_request_frames=6))
    over = scorer.score(clip, ScoreRequest(frames=8))
    assert over.result is None and over.error.status == 422 and "limit of 6" in over.error.message
    unknown = scorer.score(clip, ScoreRequest(backend="no-such-backend"))
    assert unknown.error.status == 422 and "no-such-backend" in unknown.error.message
    missing = scorer.score("/nowhere/at/all/clip.mp4")
    assert missing.error.status == 404 and "/nowhere/at/all" not in missing.error.message  # no server folder
    assert isinstance(missing, ScoreAnswer) and missing.to_json_dict() == missing.error.envelope()
    assert scorer.settings(ScoreRequest(frames=5, **{"lambda": 2})).model_dump(include={"frames", "lambda_"}) == {
        "frames": 5, "lambda_": 2.0}


def test_backends_are_cached_by_everything_that_changes_them():
    built = []

    def counting(weights, **options):
        built.append((weights, options))
        return create_backend("colmap-flow")

    register_backend("test-counting", counting)
    scorer = Scorer(ScorerConfig(score=SMALL.model_copy(update={"backend": "test-counting"}),
                                 backend_options={"test-counting": {"size": 1}}))
    config = scorer.config.score
    assert scorer.backend(config) is scorer.backend(config) and len(built) == 1
    other = scorer.backend(config.model_copy(update={"weights": "/models/other"}))  # other weights: another backend
    assert len(built) == 2 and built[1] == (config.model_copy(update={"weights": "/models/other"}).weights, {"size": 1})
    assert other is not scorer.backend(config)
    # The cache is the process's: another engine, score_video and the eval workers get the same backend, and
    # one that is not thread-safe is called by one thread at a time.
    assert Scorer(scorer.config).backend(config) is scorer.backend(config) and len(built) == 2
    assert shared_backend("test-counting", config.weights, size=1) is scorer.backend(config)
    assert scorer.backend(config).thread_safe and not create_backend("colmap-flow").thread_safe
