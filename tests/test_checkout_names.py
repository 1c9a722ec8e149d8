"""Python started in the repository root never takes the checkout's `kernels/` or `tokenizer/` folder for the
installed distributions of those names (Hugging Face's `kernels`, which transformers >= 5.25 imports; PyPI's
`tokenizer`), while `hayabusa.kernels` and `hayabusa.tokenizer` keep their re-exports.

Each case runs in a fresh interpreter whose current directory is the repository root, so the root is first on
sys.path: as `''` for `python -c` and a notebook, as the absolute path for `python -m`.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(args: list[str], extra_path: Path | None = None) -> str:
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)  # that option keeps the cwd off sys.path: the case under test needs it there
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def write_stand_in(site: Path, name: str) -> None:
    """A distribution named `name` as pip installs one: the package and its dist-info."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(f"STAND_IN = {name!r}\n")
    info = site / f"{name}-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9.9\n")


CHECK_STAND_INS = """
    import sys
    assert sys.path[0] in ("", {root!r}), sys.path[:2]
    import kernels, tokenizer
    assert kernels.STAND_IN == "kernels" and tokenizer.STAND_IN == "tokenizer", (kernels, tokenizer)
    from hayabusa.kernels import ln_linear, ln_linear_ref
    from hayabusa.tokenizer import Tokenizer
    ids = Tokenizer.from_pretrained().encode("吾輩は猫である🐯。実は慶応(慶應)大学出身")
    assert ids[:6] == [30014, 26883, 26638, 27228, 25, 26650], ids
    assert sys.modules["kernels"] is kernels and "kernels.linear" not in sys.modules
    print("ok")
"""


def test_installed_stand_ins_win_over_the_checkout_folders(tmp_path: Path) -> None:
    write_stand_in(tmp_path, "kernels")
    write_stand_in(tmp_path, "tokenizer")
    check = textwrap.dedent(CHECK_STAND_INS.format(root=str(ROOT)))
    assert run_in_root(["-c", check], extra_path=tmp_path).strip() == "ok"  # sys.path[0] == ''
    (tmp_path / "check_stand_ins.py").write_text(check)
    assert run_in_root(["-m", "check_stand_ins"], extra_path=tmp_path).strip() == "ok"  # sys.path[0] == root


def test_transformers_model_and_hayabusa_kernels_import_from_the_root() -> None:
    """transformers >= 5.25 imports HF's `kernels` while it loads a model module; the real one must come back."""
    pytest.importorskip("transformers")
    out = run_in_root(["-c", textwrap.dedent("""
        import kernels
        import transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese as modeling
        import hayabusa.kernels
        from hayabusa.kernels import ln_linear
        assert hayabusa.kernels.__name__ == "hayabusa.kernels" and callable(ln_linear)
        assert getattr(kernels, "__file__", None) != hayabusa.kernels.__file__
        print(modeling.GPTNeoXJapaneseForCausalLM.__name__)
    """)])
    assert out.strip() == "GPTNeoXJapaneseForCausalLM"


def test_a_name_nothing_else_provides_is_an_empty_namespace() -> None:
    """With no distribution of the name installed, `import tokenizer` from the root gives what Python gives a folder
    without __init__.py: a namespace with no file and no version, which transformers' availability checks (which
    import a package whose metadata they cannot find) read as "not installed"; nothing of hayabusa's runs."""
    out = run_in_root(["-c", textwrap.dedent("""
        import importlib.metadata, sys
        try:
            importlib.metadata.version("tokenizer")
            print("installed")
        except importlib.metadata.PackageNotFoundError:
            import tokenizer
            assert getattr(tokenizer, "__file__", None) is None and list(tokenizer.__path__) == []
            assert not any(name.startswith("tokenizer.") for name in sys.modules)
            print("namespace")
    """)])
    if out.strip() == "installed":
        pytest.skip("a `tokenizer` distribution is installed here; the stand-in test covers that case")
    assert out.strip() == "namespace"
