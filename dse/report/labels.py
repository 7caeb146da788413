"""How a configuration's settings are named in labels: one token per field (`warmup=1`, `lr=0.1`)."""

from __future__ import annotations

from typing import Any

TUNED = "tuned"
"""Key under which a configuration's identity holds a tuned field's list of values."""


def field_token(name: str, value: Any) -> str:
    """One field of a label: `no-master`, `warmup=1`, `fp-layers=first+last`, `lr=tuned`, `p-scale=10`."""
    if isinstance(value, dict) and TUNED in value:
        return f"{name.replace('_', '-')}=tuned"
    if name == "master_weights":
        if isinstance(value, str):
            return f"master={value}"
        return "master" if value else "no-master"
    if name == "layer_scaling":
        return "layer-scaling" if value else "no-layer-scaling"
    if name == "warmup_epochs":
        return f"warmup={value}"
    if name == "full_precision_layers":
        return f"fp-layers={'+'.join(value) if value else 'none'}"
    if name == "layers":  # per-layer rules: `layers=head:format=fp32;*.attn.*:weights=int4`
        return "layers=" + (";".join(
            f"{rule['match']}:" + ",".join(f"{k}={v}" for k, v in rule.items() if k != "match")
            for rule in value or []) or "none")
    if name == "optimizer_state":
        return f"state={value}"
    return f"{name.replace('_', '-')}={value}"


def point_label(label: str, tuning: dict[str, Any]) -> str:
    """A configuration's label with its tuning point: `fp32 sgd lr=0.1 momentum=0.8`."""
    return " ".join([label, *(field_token(name, value) for name, value in tuning.items())])
