"""The command line explains itself: every option has help, ``--version`` works, and
``compare --help`` is written for users."""
from __future__ import annotations

import argparse

import pytest

from veil import cli
from veil._version import __version__


def _parsers(parser: argparse.ArgumentParser, path: str = "veil"):
    """(command path, parser) of ``parser`` and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_has_help():
    missing = []
    for path, parser in _parsers(cli._parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options without help: " + ", ".join(missing)
    assert len(list(_parsers(cli._parser()))) > 15      # the walk saw the subcommands


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"veil {__version__}"


def test_compare_help_is_for_users(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "veil compare" in text and "--modes" in text
    assert "add_parser" not in text and "cli.py" not in text and "``" not in text


@pytest.mark.parametrize("mode, flag", [("tee", "--policy"), ("mpc", "--mpc-keys")])
def test_missing_flags_are_named_as_flags(tmp_path, capsys, mode, flag):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 4)))
    # nothing listens there: the flag is checked before any connection
    code = cli.main(["predict", "http://127.0.0.1:9", "--model", "m", "--mode", mode,
                     "--input", str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"needs {flag}" in err
    assert "policy=" not in err and "mpc_keys=" not in err


def test_client_verbs_have_docstrings():
    import pydoc

    import veil

    for verb in ("encrypt", "infer", "decrypt"):
        doc = pydoc.render_doc(getattr(veil.Client, verb), renderer=pydoc.plaintext)
        assert "service" in doc or "this machine" in doc
        assert "# --" not in doc and getattr(veil.Client, verb).__doc__


def test_tee_policy_takes_the_export_folder(tmp_path, capsys):
    """``veil tee-policy EXPORT`` and ``veil tee-policy EXPORT/tee`` write the same
    measurement; a folder exported without tee is refused by name."""
    import json

    from tests.service_util import tiny_export

    tiny_export(tmp_path / "m", "m", modes=("tee",))
    tiny_export(tmp_path / "h", "h", modes=("he",))
    assert cli.main(["tee-attester-setup", str(tmp_path / "att")]) == 0
    docs = []
    for folder in (tmp_path / "m", tmp_path / "m" / "tee"):
        out = tmp_path / f"policy-{len(docs)}.json"
        assert cli.main(["tee-policy", str(folder), "--attester", str(tmp_path / "att"),
                         "--allow-insecure", "--out", str(out)]) == 0
        docs.append(json.loads(out.read_text()))
    assert docs[0] == docs[1]
    capsys.readouterr()
    assert cli.main(["tee-policy", str(tmp_path / "h"), "--attester", str(tmp_path / "att"),
                     "--allow-insecure", "--out", str(tmp_path / "p.json")]) == 1
    assert "not tee" in capsys.readouterr().err
