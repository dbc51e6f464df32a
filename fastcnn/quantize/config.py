"""QuantConfig: how fastcnn.quantize quantizes, as one object that composes
(`dataclasses.replace(config, verify=True)`), in torchao's `quantize_(model, config)` style."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """fastcnn.quantize(model, calibration, QuantConfig(...)); each field is also a keyword of
    fastcnn.quantize (quantize(m, batches, verify=True) is quantize(m, batches,
    QuantConfig(verify=True))), and keywords given with a config replace its fields.

    observer: "minmax", "percentile" (clip at `percentile`) or "entropy" (alias "histogram":
        KL-divergence thresholds, as TensorRT calibrates).
    verify: True (tolerance INT8_LAYER_TOLERANCE, relative RMS) or a float tolerance: every
        int8 conv is compared with its fp32 layer on the first `verify_batches` calibration
        batches, and those whose error exceeds the tolerance stay fp32. fastcnn.report(result)
        lists every layer, its error (entry.error) and what stayed float and why.
    float_stem: keep the first conv in fp32. keep_float: module paths to keep in fp32.
    overflow_fix: quantize weights to 7 bits (|w| <= 63) so that CPUs without VNNI compute
        them exactly (their u8 x s8 instructions saturate otherwise, see fastcnn/cpu/int8.py);
        "auto": when the CPU running quantize has no VNNI.
    backend: pin the int8 modules to "cpu", "triton" or "eager" (None: the one in force).
    """

    observer: str = "percentile"
    percentile: float = 99.99
    verify: bool | float = False
    verify_batches: int = 4
    float_stem: bool = False
    keep_float: tuple[str, ...] | frozenset[str] = ()
    overflow_fix: bool | str = "auto"
    backend: str | None = None


FIELDS = tuple(f.name for f in dataclasses.fields(QuantConfig))
