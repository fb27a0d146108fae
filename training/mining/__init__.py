"""The pair-mining job: prompts -> seeds -> sampler -> scorer -> scored records -> preference pairs.

    vgpa mine --prompts prompts.jsonl --model MODEL_DIR --out OUT_DIR [--seeds N] [--local]

One module per responsibility, read in this order:
    config.py       MineConfig / PairConfig: every setting of a run (YAML or flags)
    job.py          the Ray Data job: inputs checked, (prompt_id, seed) rows, resume, progress, summary
    stages.py       the sample and score stages (Ray Data callable classes): the Serve app's handles,
                    or `--local` the same engines (`common.sampling`, `common.scorer`) in actor pools
    records.py      scored records on disk (Parquet parts, appended atomically, read back to resume)
    pair_policy.py  which scored videos become (winner, loser) pairs, and why the others did not
    pair_writer.py  the pairs dataset `vgpa train` reads (latents, text, I2V first-frame latents)
"""

from training.mining.config import MineConfig, PairConfig, config_from_file
from training.mining.job import mine

__all__ = ["MineConfig", "PairConfig", "config_from_file", "mine"]
