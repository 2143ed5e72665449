"""Every command through click's CliRunner: output, exit codes, and one-line errors for user mistakes."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import numpy as np
import click
import pytest

from cli.main import main
from pipeline.errors import ParameterError
from pipeline.data.images import encode_png

from .conftest import CIFAR_TAR, ROOT, digits_images, one_line_error
from .conftest import cli as run


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    r = run("extract", "digits", "--out", root / "shards")
    assert r.exit_code == 0, r.output
    # 441 patches per view of an 8x8 image up to 3x3 ((8+7+6)**2); two exact views (levels,grad), one grid key each;
    # and the code view: 25 4x4 patches x 5 nearest atoms
    assert "898 images (8x8, 1 channel(s)), 904,286 patches (904,286 keys) in 1 shard(s)" in r.stdout
    # --refit off: these tests score the run's held-out part, which a refit would train on
    r = run("train", root / "shards", "--out", root / "run", "--epochs", "2", "--dim", "16", "--refit", "off")
    assert r.exit_code == 0, r.output
    assert "epoch 2: train loss" in r.output and "run written to" in r.stdout and "distinct keys" in r.stdout
    return root


def test_evaluate_json_is_one_object(trained):
    r = run("evaluate", trained / "run", "digits", "--split", "test", "--json")
    assert r.exit_code == 0
    obj = json.loads(r.stdout)
    assert set(obj) >= {"accuracy", "n"} and obj["n"] == 899 and 0.5 < obj["accuracy"] <= 1


def test_evaluate_text(trained):
    r = run("evaluate", trained / "run", trained / "shards")
    assert r.exit_code == 0 and r.stdout.startswith("accuracy ") and "on 898 images" in r.stdout


def test_query_text_and_json(trained, tmp_path):
    imgs, labels = digits_images("test", 2)
    paths = []
    for i, img in enumerate(imgs):
        p = tmp_path / f"{i}.png"
        p.write_bytes(encode_png(img))
        paths.append(p)
    r = run("query", trained / "run", *paths, "--k", "2", "--patches", "3")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("patches: 1007 (") == 2 and "nearest: #" in r.stdout
    r = run("query", trained / "run", *paths, "--k", "2", "--patches", "0", "--json")
    objs = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(objs) == 2
    o = objs[0]
    assert o["prediction"] in [str(c) for c in range(10)]
    assert abs(sum(o["probabilities"].values()) - 1) < 1e-5
    assert len(o["patches"]) == 1007 == o["patch_counts"]["total"]
    assert o["patch_counts"]["seen"] + o["patch_counts"]["composed"] + o["patch_counts"]["unmatched"] == 1007
    assert sum(not p["seen"] for p in o["patches"]) == o["patch_counts"]["total"] - o["patch_counts"]["seen"]
    assert all(len(p["nearest"]) == 2 for p in o["patches"] if p["seen"] or p["composed"])


def test_wrong_source_path():
    one_line_error(run("extract", "/no/such/place", "--out", "/tmp/x"), "does not exist")


def test_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(run("extract", tmp_path / "empty", "--out", tmp_path / "o"), "holds no images")
    assert not (tmp_path / "o").exists()


def test_unreadable_image_in_extract_and_query(trained, tmp_path):
    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "a" / "x.png").write_bytes(b"not a png")
    one_line_error(run("extract", tmp_path / "f", "--out", tmp_path / "o"), "x.png")
    one_line_error(run("query", trained / "run", tmp_path / "f" / "a" / "x.png"), "cannot read")
    one_line_error(run("query", trained / "run", tmp_path / "missing.png"), "check the path")
    imgs, labels = digits_images("train", 3)
    for i, img in enumerate(imgs):
        (tmp_path / "f" / "a" / f"{i}.png").write_bytes(encode_png(img))
    r = run("extract", tmp_path / "f", "--skip-bad", "--out", tmp_path / "o")
    assert r.exit_code == 0 and "3 images" in r.stdout and "(1 unreadable file(s) skipped)" in r.stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["images"] == 3 and [p.rsplit("/", 1)[-1] for p in manifest["skipped"]] == ["x.png"]


def test_extract_config_that_does_not_match_the_run(trained, tmp_path):
    r = run("extract", "digits", "--limit", "20", "--levels", "8", "--out", tmp_path / "s8")
    assert r.exit_code == 0
    one_line_error(run("evaluate", trained / "run", tmp_path / "s8"), "extract the images again")


def test_images_of_another_size_are_fitted_with_a_note(trained, tmp_path):
    (tmp_path / "big.png").write_bytes(encode_png(np.zeros((10, 10, 1), np.uint8)))
    r = run("query", trained / "run", tmp_path / "big.png")
    assert r.exit_code == 0 and "is 10x10 (height x width): fitted to the run's 8x8, scaled to cover it" in r.output
    folder = tmp_path / "mixed"
    for i, side in enumerate((8, 12, 20)):
        (folder / "3").mkdir(parents=True, exist_ok=True)
        (folder / "3" / f"{i}.png").write_bytes(encode_png(np.zeros((side, side + 1, 1), np.uint8)))
    r = run("evaluate", trained / "run", folder)
    assert r.exit_code == 0 and "on 3 images" in r.output and "; 3 of another size fitted to 8x8)" in r.output


def test_bad_options(trained, tmp_path):
    one_line_error(run("extract", "digits", "--max-size", "9", "--out", tmp_path / "o"), "use at most 8x8")
    r = run("extract", "digits", "--max-size", "abc", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "is not a size" in r.stderr
    r = run("extract", "digits", "--out", trained / "shards")
    assert r.exit_code == 0 and r.stdout.endswith("(already complete)\n"), r.output
    one_line_error(run("extract", "digits", "--levels", "3", "--out", trained / "shards"), "different settings (config.levels, fingerprint)")
    r = run("train", tmp_path / "nope", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    one_line_error(run("train", tmp_path, "--out", tmp_path / "r"), "no manifest.json")
    one_line_error(run("evaluate", tmp_path, "digits"), "not a finished run")
    one_line_error(run("extract", "digits", "--position", "grid,diagonal", "--out", tmp_path / "o"), "'diagonal' is not a key kind")
    assert not (tmp_path / "o").exists()
    one_line_error(run("train", trained / "shards", "--out", tmp_path / "r", "--optimizer", "rowwise-adagrad", "--nproc", "2"), "runs in one process only")


@pytest.mark.skipif(not CIFAR_TAR.exists(), reason="shared CIFAR-10 archive not present")
def test_cifar_archive_end_to_end(tmp_path):
    # a smaller sample for the 4,096 atoms' k-means keeps the test short; every other setting is the default
    r = run("extract", CIFAR_TAR, "--per-class", "6", "--code-sample", "20000", "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    # 60 images and their mirrors (--augment auto on colour) x (3,969 levels patches up to 2x2 + 5 atoms of each of
    # the 729 6x6 code patches and the 121 6x6/2 ones)
    assert "120 images (with 1 augmented copy each) (32x32, 3 channel(s)), 986,280 patches" in r.stdout
    r = run("train", tmp_path / "s", "--out", tmp_path / "r", "--epochs", "1", "--dim", "8", "--val-fraction", "0.2")
    assert r.exit_code == 0, r.output
    # a 6x6 RGB code (108 values) is large: 4,096 atoms, and a table that learns at 0.3 and drops 30% of an image's rows
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["config"]["atoms"] == 4096
    cfg = json.loads((tmp_path / "r" / "run.json").read_text())["train_config"]
    assert (cfg["lr"], cfg["drop"]) == (0.3, "0.3")
    r = run("evaluate", tmp_path / "r", CIFAR_TAR, "--per-class", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] == 20


def test_query_says_what_to_give(trained, tmp_path):
    one_line_error(run("query", trained / "run"), "give one or more image files")
    (tmp_path / "pics").mkdir()
    one_line_error(run("query", trained / "run", tmp_path / "pics"), "use --batch")


def test_evaluate_says_which_split_it_scored(trained):
    r = run("evaluate", trained / "run", "digits", "--limit", "30")
    assert r.exit_code == 0 and "(split train;" in r.output, r.output
    r = run("evaluate", trained / "run", "digits", "--split", "test", "--limit", "30", "--json")
    assert json.loads(r.output)["scored"] == "split test"


def test_png_of_two_images_with_one_name_are_both_kept(trained, tmp_path):
    x, _ = digits_images("test", 2)
    for i, d in enumerate(("a", "b")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "img.png").write_bytes(encode_png(x[i]))
    r = run("query", trained / "run", tmp_path / "a" / "img.png", tmp_path / "b" / "img.png", "--png", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img-2.png", "img.png"]


def test_evaluate_validation_scores_the_held_out_part_and_reports_classes(trained):
    r = run("evaluate", trained / "run", "--validation", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    m = json.loads((trained / "run" / "run.json").read_text())
    assert res["n"] == m["final"]["val_images"] and res["scored"] == "the held-out part of the training shards"
    assert abs(res["accuracy"] - m["final"]["val_accuracy"]) < 1e-6  # what training measured on the same images
    conf = np.array(res["confusion"])
    assert conf.sum() == res["n"] and np.trace(conf) == round(res["accuracy"] * res["n"])
    one_line_error(run("evaluate", trained / "run"), "nothing to score: give SOURCE")


def test_info_describes_the_run(trained):
    r = run("info", trained / "run", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    m = json.loads((trained / "run" / "run.json").read_text())
    on_disk = {p.name: p.stat().st_size for p in (trained / "run").iterdir() if p.is_file()}
    assert s["classes"] == m["class_names"] and s["rows"] == m["rows"] and s["files_bytes"] == on_disk
    assert s["val_accuracy"] == m["final"]["val_accuracy"] and s["bytes"] == sum(on_disk.values())
    r = run("info", trained / "run")
    assert r.exit_code == 0, r.output
    # the text is the contract: each line written out from run.json and the directory
    ex, tr, f = m["extract_config"], m["train_config"], m["final"]
    lines = r.stdout.splitlines()
    assert lines[0] == f"{trained / 'run'}: 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), 8x8 images with 1 channel(s)"
    assert lines[1] == (f"  held-out accuracy {f['val_accuracy']:.4f} at epoch {m['best_epoch']} of {m['epochs_run']} "
                        f"(train {f['train_accuracy']:.4f}); {m['patterns']:,} patterns, {m['rows']:,} table rows of dimension "
                        f"{tr['dim']}; index {m['index']['factory']}; unseen patches: drop")
    assert lines[2] == (f"  extracted with views {ex['views']} up to {ex['max_h']}x{ex['max_w']}, position {ex['position']}, grid {ex['grid']}, "
                        f"code shapes {ex['code_shapes']} ({ex['atoms']} atoms, k {ex['code_k']}); trained {tr['epochs']} epochs max, "
                        f"lr {tr['lr']}, bag {tr['bag']}; from {m['shards']}")
    assert lines[3] == f"  on disk {sum(on_disk.values()) / 1e6:.1f} MB: " + ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in sorted(on_disk.items()))
    assert len(lines) == 4


def test_query_resizes_and_converts_with_a_notice(trained, tmp_path):
    from PIL import Image

    x, _ = digits_images("test", 1)
    big = np.asarray(Image.fromarray(x[0][..., 0]).resize((24, 16)))
    (tmp_path / "big.png").write_bytes(encode_png(big[..., None]))
    r = run("query", trained / "run", tmp_path / "big.png", "--json")
    assert r.exit_code == 0 and "note: " in r.stderr and "fitted to the run's 8x8" in r.stderr, r.output
    r = run("query", trained / "run", tmp_path / "big.png", "--resize", "8x8", "--json")
    assert r.exit_code == 0 and "fitted" not in r.stderr, r.output
    rgb = np.repeat(x[0], 3, axis=-1)
    (tmp_path / "rgb.png").write_bytes(encode_png(rgb))
    r = run("query", trained / "run", tmp_path / "rgb.png", "--json")
    assert r.exit_code == 0 and "note: " in r.stderr and "converted" in r.stderr, r.stderr
    gray = json.loads(run("query", trained / "run", tmp_path / "rgb.png", "--json").stdout)
    (tmp_path / "g.png").write_bytes(encode_png(x[0]))
    same = json.loads(run("query", trained / "run", tmp_path / "g.png", "--json").stdout)
    assert gray["probabilities"] == same["probabilities"]  # a gray image saved as RGB reads as itself


def test_resize_is_checked_and_refused_with_shards(trained, tmp_path):
    x, _ = digits_images("test", 1)
    (tmp_path / "g.png").write_bytes(encode_png(x[0]))
    one_line_error(run("query", trained / "run", tmp_path / "g.png", "--resize", "100000x100000"), "past 8192")
    one_line_error(run("evaluate", trained / "run", trained / "shards", "--resize", "8x8"), "shards hold keys already made")
    r = run("evaluate", trained / "run", "digits", "--split", "test", "--limit", "20", "--resize", "8x8", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["n"] == 20, r.output


def test_progress_in_a_log_is_plain_lines_and_names_the_finishing_steps(trained, tmp_path):
    """stderr a pipe (not a terminal): --progress auto prints whole lines, no carriage returns."""
    env = {**os.environ, "PIPE_PROGRESS": "auto"}
    out = subprocess.run([sys.executable, "-m", "cli.main", "train", str(trained / "shards"), "--out", str(tmp_path / "r"), "--epochs", "1", "--dim", "8"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "\x1b" not in out.stderr
    lines = out.stderr.splitlines()
    assert any(l.startswith("vocabulary: 100%") for l in lines) and any(l.startswith("train:") for l in lines)
    assert any(l.startswith("index: 100%") and "vec" in l for l in lines)
    assert "then: building the pattern index (Flat over" in out.stdout
    quiet = subprocess.run([sys.executable, "-m", "cli.main", "--progress", "off", "train", str(trained / "shards"), "--out", str(tmp_path / "q"),
                            "--epochs", "1", "--dim", "8"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    # no progress at all; what is left is the warning that the held-out part is small
    assert quiet.returncode == 0 and all(l.startswith("WARNING ") for l in quiet.stderr.splitlines()), quiet.stderr
    assert "raise --val-fraction (now 0.1)" in quiet.stderr  # the library's `val_fraction`, written as its flag


def test_a_query_never_imports_torch(trained):
    img = trained / "one.png"
    img.write_bytes(encode_png(digits_images("test", 1)[0][0]))
    code = ("import sys; from click.testing import CliRunner; from cli.main import main; "
            f"r = CliRunner().invoke(main, ['query', {str(trained / 'run')!r}, {str(img)!r}, '--json']); "
            "assert r.exit_code == 0, r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_every_option_of_every_command_is_in_its_section_of_docs_cli():
    """docs/cli.md has one section per command (``## `pipe NAME``); each names every option click knows."""
    import re

    doc = (ROOT / "docs" / "cli.md").read_text()
    parts = re.split(r"^## `pipe (\w+)", doc, flags=re.M)
    sections: dict[str, str] = {}
    for name, text in zip(parts[1::2], parts[2::2]):
        sections[name] = sections.get(name, "") + text
    assert sorted(sections) == sorted(main.commands)
    missing = {name: [o for p in cmd.params for o in getattr(p, "opts", []) if o.startswith("--") and o not in sections[name]]
               for name, cmd in main.commands.items()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_docs_cli_is_the_rendering_of_the_click_commands():
    """docs/cli.md is what scripts/cli_reference.py renders from the commands (their help, every
    option with its default), and no option lacks help text."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    assert ref.undocumented() == []
    page = ref.render()
    assert (ROOT / "docs" / "cli.md").read_text() == page, "run: python scripts/cli_reference.py"
    # the rendering itself: one table row per option, with the option's default
    for name, cmd in main.commands.items():
        section = page.split(f"## `pipe {name} ", 1)[1].split("\n## ", 1)[0]
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                row = [ln for ln in section.splitlines() if re.match(rf"\| `{re.escape(p.opts[0])}[ `]", ln)]
                assert len(row) == 1, (name, p.opts)
                if p.show_default and p.default is not None and not p.is_flag:
                    assert f"| `{p.default}` |" in row[0], (name, p.opts, row[0])


def test_library_errors_name_parameters_and_the_cli_names_their_flags(trained, tmp_path):
    import re

    import pipeline
    from cli.main import flag
    from pipeline.errors import ParameterError

    # a Python caller reads the parameter it passed; the CLI user the flag they typed
    with pytest.raises(ParameterError, match=r"^val_fraction 2\.0 ") as e:
        pipeline.TrainConfig(val_fraction=2.0)
    assert e.value.param == "val_fraction"
    with pytest.raises(ParameterError, match=r"^k 0 must be at least 1$"):
        pipeline.load(trained / "run").nearest_patterns(digits_images("test", 1)[0][0], k=0)
    one_line_error(run("train", trained / "shards", "--out", tmp_path / "r", "--val-fraction", "2"), "--val-fraction 2.0 ")
    one_line_error(run("train", trained / "shards", "--from", tmp_path, "--out", tmp_path / "r2"), f"--from {tmp_path} is not a finished run")
    # every parameter the library names has its flag on some command (written out from the source)
    named = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        named |= set(re.findall(r'ParameterError\(\s*"([a-z_]+)"', path.read_text()))
    options = {o for cmd in main.commands.values() for p in cmd.params for o in getattr(p, "opts", [])}
    assert len(named) > 40 and {flag(n) for n in named} <= options, {n: flag(n) for n in named if flag(n) not in options}


def test_every_command_that_prints_a_result_prints_it_as_json(tmp_path):
    """--json on extract, train and index: stdout is one JSON object, the artifact's own record."""
    r = run("extract", "digits", "--limit", "120", "--code-shapes", "none", "--out", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.output
    got, manifest = json.loads(r.stdout), json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert {k: got[k] for k in manifest} == manifest and got["resumed_shards"] == 0
    r = run("train", tmp_path / "s", "--out", tmp_path / "r", "--epochs", "1", "--dim", "8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads((tmp_path / "r" / "run.json").read_text())
    r = run("index", tmp_path / "r", "--index", "flat", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got.pop("rebuilt") is False and got == json.loads((tmp_path / "r" / "run.json").read_text())["index"]
    commands = {name for name, cmd in main.commands.items() if any("--json" in getattr(p, "opts", []) for p in cmd.params)}
    assert commands == set(main.commands) - {"serve"}  # serve answers over HTTP in JSON already


def test_option_defaults_are_the_configs():
    """An option that sets a config field defaults to that field's default, in extract and train alike."""
    from pipeline import ExtractConfig, TrainConfig

    checked = 0
    for command, config in (("extract", ExtractConfig()), ("train", TrainConfig())):
        for p in main.commands[command].params:
            if p.name in config.__dataclass_fields__ and p.name not in ("resize", "dictionary"):  # a size text and a file, not the fields
                assert p.default == getattr(config, p.name), (command, p.name, p.default, getattr(config, p.name))
                checked += 1
    assert checked > 30


def test_option_bounds_are_the_configs():
    """Each bounded field of a config is refused just outside its bound (and taken at its ends), and
    the option that sets it says that bound in its help."""
    from pipeline import ExtractConfig, TrainConfig
    from pipeline.config import EXTRACT_BOUNDS, TRAIN_BOUNDS

    for command, config, bounds in (("extract", ExtractConfig, EXTRACT_BOUNDS), ("train", TrainConfig, TRAIN_BOUNDS)):
        helps = {p.name: p.help for p in main.commands[command].params}
        for name, bound in bounds.items():
            assert helps[name].endswith(f" Values {bound.text()}."), (command, name)
            kind = type(getattr(config(), name))
            step = 1 if kind is int else 1e-9
            for end, is_open, outside in ((bound.lo, bound.lo_open, -step), (bound.hi, bound.hi_open, step)):
                if end is None:
                    continue
                with pytest.raises(ParameterError, match=f"^{name} .* must be {re.escape(bound.text())}"):
                    config(**{name: kind(end if is_open else end + outside)})
                if not is_open and not (name == "lr" or name == "head_lr"):
                    config(**{name: kind(end)})  # the end itself is allowed


def test_library_messages_name_parameters_not_flags():
    """No message the library raises, makes or logs names a CLI flag (`--epochs`); it names the parameter
    (`` `epochs` ``), which the CLI writes as its flag. Only torchrun's own command line (ddp.py)
    has flags, being one."""
    import ast
    import re

    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name == "ddp.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            parts = [node.exc] if isinstance(node, ast.Raise) and node.exc is not None else []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("warning", "info", "error"):
                parts = list(node.args)  # a logged message
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("Error"):
                parts = list(node.args)  # an error made here and raised elsewhere
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
                parts = [node.value]  # a message kept in a constant
            for part in parts:
                for c in ast.walk(part):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and re.search(r"(?<![\w-])--[a-z]", c.value):
                        found.append(f"{path.relative_to(ROOT)}:{c.lineno}")
    assert not found, found
    from cli.main import with_flags

    assert with_flags("lower `min_count` or `lr`; `index` flat; `start` RUN") == "lower --min-count or --lr; --index flat; --from RUN"


def test_a_library_message_reaches_the_command_line_with_flags(tmp_path, digits_shards):
    import pipeline

    r = run("train", digits_shards, "--out", tmp_path / "r", "--min-count", "100000000")
    one_line_error(r, "Error: no key occurs --min-count 100000000 times in the training images; lower --min-count")
    with pytest.raises(pipeline.PipelineError, match=r"^no key occurs `min_count` 100000000 times in the training images; lower `min_count`$"):
        pipeline.train(pipeline.open_shards(digits_shards), tmp_path / "p", pipeline.TrainConfig(min_count=100000000))
