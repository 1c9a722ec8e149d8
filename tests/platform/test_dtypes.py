"""`--dtype auto`: float16 on cuda; on a cpu bfloat16 only where the CPU lists bf16 multiplies, else float32."""

import pytest
import torch

from hayabusa.engine.api import Engine
from hayabusa.engine.cli import build_parser
from hayabusa.engine.platform import dtypes
from hayabusa.kernels._reference_gemm import onednn_fuses

ZEN4_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n"
SAPPHIRE_RAPIDS_FLAGS = "flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"
AVX2_FLAGS = "flags\t\t: fpu sse2 avx2 fma\n"
# a bug named like a flag, after the flags line: not a flag
AVX512_ONLY_FLAGS = "flags\t\t: avx512f avx512bw avx512_vnni\nbugs\t\t: avx512_bf16\n"


@pytest.mark.parametrize("cpuinfo,native", [(ZEN4_FLAGS, True), (SAPPHIRE_RAPIDS_FLAGS, True), (AVX2_FLAGS, False),
                                            (AVX512_ONLY_FLAGS, False), ("", False)])
def test_native_bf16_is_read_from_the_flags_line(cpuinfo, native):
    assert dtypes.cpu_flags_have_native_bf16(cpuinfo) is native


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_a_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: native)
    assert dtypes.auto_dtype(torch.device("cpu")) == (expected if onednn_fuses(torch.bfloat16)
                                                      else torch.float32)
    assert dtypes.auto_dtype(torch.device("cuda")) == torch.float16


def test_engine_and_cli_take_auto(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    engine = Engine.from_pretrained("tiny", dtype="auto", device="cpu")
    assert engine.paged.model.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be a torch.dtype, 'auto' or None, got 'bf16'"):
        Engine.from_pretrained("tiny", dtype="bf16", device="cpu")

    def parsed_dtype(*argv: str):
        return build_parser(list(argv))[0].parse_args(list(argv)).dtype

    assert parsed_dtype("generate", "--model", "tiny", "猫") is None  # auto
    assert parsed_dtype("generate", "--model", "tiny", "猫", "--dtype", "auto") is None
    assert parsed_dtype("generate", "--model", "tiny", "猫", "--dtype", "bfloat16") == torch.bfloat16
    assert parsed_dtype("verify", "--model", "tiny") == "auto"
