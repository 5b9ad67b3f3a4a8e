import json
import sys

import pytest

from eqat.cli import main


@pytest.fixture
def cli(monkeypatch, capsys):
    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["eqat", *args])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, " ".join(err.split())  # rich wraps long lines

    return run


@pytest.fixture
def text_file(tmp_path):
    from eqat.data import CARRIED

    p = tmp_path / "eval.txt"
    p.write_text(CARRIED["wikitext2"].read_text(encoding="utf-8")[:20_000])
    return p


@pytest.mark.parametrize("command", ["quantize", "eval", "info"])
def test_help_has_examples(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0 and "Examples" in out


def test_full_tiny_run_and_eval_agree(cli, tiny_model_dir, tmp_path, text_file):
    model = tiny_model_dir("qwen2")
    out = tmp_path / "q"
    args = ["--eval-data", str(text_file), "--seqlen", "32", "--max-windows", "3"]
    code, _, err = cli("quantize", "--model", str(model), "--scheme", "w3g32", "--out", str(out), "-q", *args)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "eqat_config.json", "report.json", "run_config.json",
            "layer_error.png", "tokenizer.json"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["perplexity"]["windows"] == 3 and report["fp_perplexity"]["ppl"] > 1
    assert len(report["layer_relative_error"]) == 14
    code, stdout, err = cli("eval", str(out), "--data", str(text_file), "--seqlen", "32", "--max-windows", "3",
                            "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["ppl"] == pytest.approx(report["perplexity"]["ppl"], rel=1e-6)
    code, stdout, _ = cli("info", str(out))
    assert code == 0 and "w3" in stdout.replace("'bits': 3", "w3") and "14 quantized modules" in stdout
    code, _, err = cli("quantize", "--model", str(model), "--out", str(out), "--no-eval", "-q")
    assert code == 2 and "--force" in err


def _assert_bad(cli, tmp_path, args, *fragments):
    out = tmp_path / "out"
    code, _, err = cli("quantize", "--out", str(out), "-q", *args)
    assert code == 2, err
    for f in fragments:
        assert f in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_bits(cli, tmp_path):
    _assert_bad(cli, tmp_path, ["--bits", "5"], "bits=5", "2, 3, 4, 8")


def test_group_not_dividing(cli, tmp_path, tiny_model_dir):
    _assert_bad(cli, tmp_path, ["--model", str(tiny_model_dir()), "--group-size", "48"],
                "group_size=48", "in_features=64", "model.layers.0.self_attn.q_proj", "32")


def test_missing_model(cli, tmp_path):
    _assert_bad(cli, tmp_path, ["--model", str(tmp_path / "nope")], "model folder not found")


def test_not_a_causal_lm(cli, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    _assert_bad(cli, tmp_path, ["--model", str(folder)], "not a causal LM")


def test_unreadable_data(cli, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    _assert_bad(cli, tmp_path, ["--model", str(tiny_model_dir()), "--eval-data", str(bad)], "bad.jsonl:1")


def test_unknown_method_and_dtype(cli, tmp_path, tiny_model_dir):
    _assert_bad(cli, tmp_path, ["--model", str(tiny_model_dir()), "--method", "magic"], "unknown method 'magic'")
    _assert_bad(cli, tmp_path, ["--model", str(tiny_model_dir()), "--dtype", "float32"], "float16 or bfloat16")


def test_usage_error_exit_2(cli):
    code, _, _ = cli("quantize", "--bits", "four")
    assert code == 2
