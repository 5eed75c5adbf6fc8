"""What a training run's checkpoints must agree on to be resumed: the settings that change what
is trained. They are stored with every checkpoint (`state.json`'s `settings`); a rerun that
differs in any is refused, naming each, except for one defined change: `--extend` continues a
run to more optimizer steps (a larger `--max-steps` or `--epochs`). The learning-rate schedule
is then the new length's: from the resumed step on, warm-up and linear decay follow the
schedule a run of the new length has at that step.

Not among them: `save_every`, `keep_checkpoints`, `gradient_checkpointing` (same gradients) and
`max_length` (only a check). Checkpoints written before settings were stored are not checked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from fthss.errors import ConfigError, differences

_IGNORED = {"save_every", "keep_checkpoints", "gradient_checkpointing", "max_length"}
LENGTH = {"max_steps", "epochs", "total_steps"}  # what --extend may change, to more steps


def run_settings(config, chains, trained, frozen, global_batch: int, total_steps: int) -> dict:
    """The settings of a run: its hyper-parameters, the kind and size of the `trained` stages,
    its global batch and length, a hash of its training sequences (data, method,
    --max-samples all change them) and of the `frozen` stages it reads."""
    data = hashlib.sha256()
    for chain in chains:
        data.update(json.dumps(asdict(chain), sort_keys=True).encode("utf-8", "backslashreplace"))
    stages = hashlib.sha256()
    for stage in sorted(frozen, key=lambda s: s.name):
        stages.update(stage.name.encode("utf-8"))
        stages.update(stage.current_weight.detach().float().cpu().numpy().tobytes())
        for name, factor in sorted(stage.state_dict().items()):  # a lora stage's deltas
            if ".lora_" in f".{name}":
                stages.update(factor.detach().float().cpu().numpy().tobytes())
    hyper = {k: v for k, v in config.to_json().items() if k not in _IGNORED}
    hyper["trained"] = {s.name: [s.config.kind, s.num_virtual_tokens] + (
        [s.config.lora_rank, s.config.lora_alpha, list(s.config.lora_targets)]
        if s.config.kind == "lora" else []) for s in trained}
    if config.max_steps is not None:
        del hyper["epochs"]  # --max-steps overrides it: another value changes nothing
    return {**hyper, "global_batch": global_batch, "total_steps": total_steps,
            "data_sha256": data.hexdigest(), "frozen_stages_sha256": stages.hexdigest()}


def check_settings(saved: dict | None, current: dict, extend: bool, where: str) -> None:
    """Refuse (ConfigError naming `where` and each differing setting) a rerun whose settings
    differ from the checkpoint's, but for a longer run with `extend`."""
    if saved is None:  # a checkpoint from before settings were stored
        return
    if not isinstance(saved, dict):
        raise ConfigError(f"{where}: settings must be a JSON object")
    differs = differences(saved, current)
    described = "; ".join(differs.values())
    if differs.keys() - LENGTH:
        raise ConfigError(f"{where}: this run's settings differ from those of the run it would "
                          f"resume ({described}); rerun with the same settings, or choose "
                          "another --out")
    if saved.get("total_steps") == current["total_steps"]:
        return  # the same run, its length given another way (--max-steps or --epochs)
    if not extend:
        raise ConfigError(f"{where}: the run it would resume was {saved.get('total_steps')} "
                          f"steps, this one {current['total_steps']} ({described}); pass "
                          "--extend to continue it to more steps, or choose another --out")
    before = saved.get("total_steps")
    if not isinstance(before, int) or not current["total_steps"] > before:
        raise ConfigError(f"{where}: --extend continues a run to more steps, but this one has "
                          f"{current['total_steps']}, not more than the "
                          f"{saved.get('total_steps')} of the run it would resume")
