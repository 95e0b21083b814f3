"""Every README code block is executed: the docs cannot drift from the code."""
import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}      # one script: later blocks continue earlier ones
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "bundles" / "server" / "model.json").exists()


def test_readme_quick_start_names_the_make_targets():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make demo" in quick and "make test" in quick
    makefile = (README.parent / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (README.parent / ".ci" / "run").read_text()


def test_readme_keys_commands_run(tmp_path):
    """The `veil keys` lines of the README's limits example, as written."""
    import shlex
    import subprocess
    import sys

    text = README.read_text()
    block = text.split("- **Limits**", 1)[1].split("```", 2)[1]
    lines = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    lines = [ln for ln in lines if ln.startswith("veil keys")]
    assert len(lines) == 4, lines
    out = {}
    for ln in lines:
        argv = shlex.split(ln.replace("store/", str(tmp_path / "store")))
        if argv[2] == "revoke":
            argv[3] = "alice"                          # ID: the name works too
        r = subprocess.run([sys.executable, "-m", "veil", *argv[1:]], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (ln, r.stderr)
        out[argv[2]] = r.stdout
    assert out["create"].startswith("veil_")
    listed = out["list"]
    assert "alice" in listed and "16" in listed and "20" in listed, listed
