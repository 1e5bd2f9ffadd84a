"""loralite.precision: the compute dtype "auto" picks, and when a 16-bit CPU gradient is transposed."""

import pytest
import torch

from loralite import precision
from loralite.cli import build_parser
from loralite.train import TrainConfig, autocasts_bf16

AVX2 = frozenset({"avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16"}
AMX = AVX2 | {"avx512f", "amx_bf16", "amx_fp16", "avx512_fp16"}


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given flags and bf16 speed-up over float32."""

    def pretend(features, speedup=4.0):
        monkeypatch.setattr(precision, "cpu_features", lambda: frozenset(features))
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)

    return pretend


@pytest.mark.parametrize("features, speedup, expected", [
    (AVX2, 4.0, torch.float32),  # no bf16 units: float32 whatever a measurement would say
    (AVX512_BF16, 4.0, torch.bfloat16),
    (AVX512_BF16, 1.2, torch.float32),  # units, but bf16 measured too little faster to pay
    (AMX, 10.0, torch.bfloat16),
    (frozenset(), 4.0, torch.float32),  # no /proc/cpuinfo
])
def test_auto_on_cpu(cpu, features, speedup, expected):
    cpu(features, speedup)
    assert precision.auto_dtype("cpu") == expected
    assert precision.resolve("auto", "cpu") == expected
    assert autocasts_bf16("auto", "cpu") == (expected == torch.bfloat16)


def test_explicit_dtypes_pass_through_and_bad_names_are_refused(cpu):
    cpu(AVX512_BF16)
    assert precision.resolve(torch.float16, "cpu") == torch.float16
    assert autocasts_bf16(False, "cpu") is False and autocasts_bf16(True, "cpu") is True
    with pytest.raises(ValueError, match="'fast'"):
        precision.resolve("fast")


@pytest.mark.parametrize("features, bf16, fp16", [(AVX2, True, True), (AVX512_BF16, False, True),
                                                  (AMX, False, False)])
def test_16bit_gradients_are_transposed_only_without_units(cpu, features, bf16, fp16):
    cpu(features)
    assert precision.transposes_16bit_gradient(torch.bfloat16) == bf16
    assert precision.transposes_16bit_gradient(torch.float16) == fp16
    assert not precision.transposes_16bit_gradient(torch.float32)


def test_this_cpu_is_read_and_measured():
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    assert precision.cpu_features() == flags
    bf16 = precision.has_native_units(torch.bfloat16)
    assert bf16 == bool(flags & {"avx512_bf16", "amx_bf16"})
    prefers = bf16 and precision.cpu_bf16_speedup() >= precision.BF16_MIN_SPEEDUP
    assert precision.auto_dtype("cpu") == (torch.bfloat16 if prefers else torch.float32)
    assert precision.auto_dtype("meta") == torch.float32


def test_auto_for_a_gpu_that_is_not_here_is_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.auto_dtype("cuda") == torch.bfloat16  # estimate_memory sizing a GPU run


def test_bad_device_flag_is_named(capsys):
    from loralite.cli import main

    assert main(["generate", "--device", "gpu", "--prompt", "x"]) == 2
    assert "--device 'gpu'" in capsys.readouterr().err


def test_train_config_defaults_to_auto():
    assert TrainConfig().bf16 == "auto"


@pytest.mark.parametrize("flags, expected", [([], None), (["--dtype", "auto"], "auto"),
                                             (["--dtype", "float32"], "float32"), (["--bf16"], None)])
def test_cli_dtype_flags(flags, expected):
    args = build_parser().parse_args(["train", "--data", "d.jsonl", "--output-dir", "o", *flags])
    assert args.dtype == expected
    assert build_parser().parse_args(["generate"]).dtype == "auto"
