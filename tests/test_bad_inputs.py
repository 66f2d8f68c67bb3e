"""Every bad input gets one ``mola: error:`` line, exit status 2, and leaves the disk untouched.

Each row of the table runs the ``mola`` command line in its own process and checks: exit status
2, exactly one line on stderr, that line starting ``mola: error:`` and naming the culprit, no
traceback, and every file that existed before byte-for-byte unchanged (and no file created).

Starting a fresh Python with torch and transformers costs seconds per row, so by default each
row runs in a process forked from one warm server process that imported mola and its stack once,
then does exactly what the ``mola`` console script does (``sys.exit(mola.cli.main())``) with
its own stdin, stdout, stderr and working directory. ``MOLA_TEST_REAL_CLI=1`` runs every row
through the real ``mola`` executable instead (slow); :func:`test_real_console_script` always
runs a few that way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mola.cli import main

REAL_CLI = os.environ.get("MOLA_TEST_REAL_CLI") == "1"
CHAT_ROW = {
    "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
}

SERVER = r"""
import json, os, sys, traceback
import mola.cli, mola.commands.train, mola.commands.eval, mola.commands.generate
import mola.commands.analyze, mola.commands.demo, mola.training.pipeline, mola.training.trainer
import transformers
transformers.AutoModelForCausalLM, transformers.AutoTokenizer
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            for fd, name, mode in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY),
                                   (2, req["err"], os.O_WRONLY)):
                os.dup2(os.open(name, mode | (os.O_CREAT | os.O_TRUNC if fd else 0)), fd)
            sys.argv = ["mola", *req["argv"]]
            try:
                code = mola.cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (exc.code is not None)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": src + (os.pathsep + path if path else ""),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


class Runner:
    """Runs ``mola ARGV`` in a child process; returns ``(exit status, stdout, stderr)``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server = None
        if not REAL_CLI:
            self.server = subprocess.Popen(
                [sys.executable, "-c", SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=_env(),
            )
            assert self.server.stdout.readline().strip() == "ready"

    def __call__(self, argv: list[str], cwd: Path) -> tuple[int, str, str]:
        if self.server is None:
            return real_mola(argv, cwd)
        out, err = self.workdir / "stdout", self.workdir / "stderr"
        request = {"argv": argv, "cwd": str(cwd), "out": str(out), "err": str(err)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        rc = json.loads(self.server.stdout.readline())["rc"]
        return rc, out.read_text(), err.read_text()

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)


def real_mola(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    exe = shutil.which("mola")
    cmd = [exe] if exe else [sys.executable, "-m", "mola.cli"]
    run = subprocess.run(
        [*cmd, *argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )
    return run.returncode, run.stdout, run.stderr


MC_ROWS = [
    {"question": "Is the sky blue on a clear day?", "choices": ["yes", "no"], "answer": "yes"},
    {"question": "Is a brick lighter than a feather?", "choices": ["yes", "no"], "answer": "B"},
] * 2


@dataclass
class World:
    """The shared files: a tiny model, a finished one-step run (the adapter), good data."""

    root: Path
    model: str
    run: str
    data: str
    runner: Runner
    case: Path = Path()

    def write(self, name: str, text: str | bytes) -> str:
        path = self.case / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    def adapter(self, name: str = "adapter") -> Path:
        """A copy of the trained adapter in this row's directory, to damage."""
        path = self.case / name
        path.mkdir()
        for file in ("adapter_config.json", "adapter_model.safetensors", "train_config.yaml"):
            shutil.copy(Path(self.run) / file, path / file)
        return path

    def adapter_config(self, name: str, change) -> str:
        path = self.adapter(name)
        data = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps(change(data)))
        return str(path)

    def adapter_weights(self, name: str, change) -> str:
        path = self.adapter(name)
        tensors = load_file(path / "adapter_model.safetensors")
        save_file(change(tensors), path / "adapter_model.safetensors")
        return str(path)

    def adapter_bytes(self, name: str, change) -> str:
        path = self.adapter(name)
        file = path / "adapter_model.safetensors"
        file.write_bytes(change(file.read_bytes()))
        return str(path)

    def model_copy(self, name: str, keep=("config.json",), extra=None) -> str:
        path = self.case / name
        path.mkdir()
        for file in keep:
            shutil.copy(Path(self.model) / file, path / file)
        for file, data in (extra or {}).items():
            (path / file).write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path)

    def train(self, *flags: str) -> list[str]:
        """``mola train`` on the tiny model and good data, into a fresh output, plus ``flags``."""
        return [
            "train",
            "--model",
            self.model,
            "--data",
            self.data,
            "--output",
            str(self.case / "out"),
            "--experts",
            "2",
            "--r",
            "2",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--no-progress",
            *flags,
        ]

    def eval(self, adapter: str, *flags: str) -> list[str]:
        return ["eval", "--adapter", adapter, "--data", self.data, "--no-progress", *flags]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("bad-inputs")
    runner = Runner(root)
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    model = root / "model"
    shutil.copytree(tiny_llama_dir, model)
    w = World(root, str(model), str(root / "run"), str(data), runner)
    w.case = root
    argv = w.train("--output", w.run, "--save-steps", "1", "--eval-data", str(data))
    rc, out, err = runner(argv, root)
    assert rc == 0, err
    yield w
    runner.close()


def snapshot(*roots: Path) -> dict[str, str]:
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name not in ("stdout", "stderr"):
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _set(key, value):
    def change(data):
        data[key] = value
        return data

    return change


def _drop_first(tensors):
    return dict(list(tensors.items())[1:])


def _reshape_first(tensors):
    name = next(iter(tensors))
    return {**tensors, name: torch.zeros(3, 5)}


TINY_BIN = b"PK\x03\x04 not really a pickle"

# (id, argv of the World, text the error line must contain)
ROWS = [
    # -- flags: each option is checked once, with the flag's name and range
    ("experts-empty-item", lambda w: w.train("--experts", "2,,4"), "--experts: empty item"),
    ("experts-zero", lambda w: w.train("--experts", "2,0"), "--experts: every value"),
    ("experts-too-many", lambda w: w.train("--experts", "2,2,2"), "--experts/--top-k/--r"),
    ("lr-inf", lambda w: w.train("--lr", "inf"), "--lr: must be a finite number > 0"),
    ("lr-nan", lambda w: w.train("--lr", "nan"), "--lr"),
    ("lr-negative", lambda w: w.train("--lr", "-1e-3"), "--lr"),
    ("max-steps-0", lambda w: w.train("--max-steps", "0"), "--max-steps: must be an integer"),
    ("max-steps-negative", lambda w: w.train("--max-steps", "-5"), "--max-steps"),
    ("max-steps-not-int", lambda w: w.train("--max-steps", "x"), "--max-steps"),
    ("epochs-0", lambda w: w.train("--max-steps", "-1", "--epochs", "0"), "--epochs"),
    ("warmup-ratio-2", lambda w: w.train("--warmup-ratio", "2"), "--warmup-ratio"),
    ("save-steps-negative", lambda w: w.train("--save-steps", "-1"), "--save-steps"),
    ("dropout-1", lambda w: w.train("--dropout", "1"), "--dropout"),
    ("top-p-0", lambda w: w.train("--router", "topp", "--top-p", "0"), "--top-p"),
    ("top-k-above-experts", lambda w: w.train("--top-k", "3"), "--top-k: 3 is more than"),
    ("r-0", lambda w: w.train("--r", "0"), "--r: every value"),
    ("batch-size-0", lambda w: w.train("--batch-size", "0"), "--batch-size"),
    ("seed-negative", lambda w: w.train("--seed", "-1"), "--seed"),
    ("scheduler-unknown", lambda w: w.train("--scheduler", "cosnie"), "--scheduler"),
    ("router-unknown", lambda w: w.train("--router", "nope"), "--router"),
    ("unknown-flag", lambda w: w.train("--learning-rate", "1"), "--learning-rate"),
    ("targets-empty-item", lambda w: w.train("--target-modules", "q_proj,,v_proj"), "--target"),
    (
        "target-typo",
        lambda w: w.train("--target-modules", "q_proj,nonexistent_proj"),
        "nonexistent_proj",
    ),
    ("resume-and-overwrite", lambda w: w.train("--resume", "--overwrite"), "--resume"),
    ("task-unknown", lambda w: ["train", "--task", "nope"], "--task: unknown task 'nope'"),
    ("report-to-unknown", lambda w: w.train("--report-to", "comet"), "--report-to: unknown"),
    ("data-columns-not-pairs", lambda w: w.train("--data-columns", "question"), "--data-columns"),
    (
        "chat-unknown-role",
        lambda w: w.train(
            "--data", w.write("c.jsonl", json.dumps({"messages": [{"role": "bot"}]}))
        ),
        "c.jsonl line 1: field 'messages' turn 1",
    ),
    (
        "chat-data-alpaca-template",
        lambda w: w.train(
            "--data", w.write("c.jsonl", json.dumps(CHAT_ROW)), "--template", "alpaca"
        ),
        "--template alpaca: chat data",
    ),
    (
        "data-columns-missing-column",
        lambda w: w.train("--data", w.data, "--data-columns", "question=query"),
        "mc.jsonl line 1: no column 'query'",
    ),
    (
        "harness-fewshot-alone",
        lambda w: ["eval", "--adapter", w.run, "--num-fewshot", "2"],
        "--num-fewshot: only with --harness",
    ),
    # -- config files
    ("yaml-missing", lambda w: ["train", str(w.case / "missing.yaml")], "missing.yaml"),
    ("yaml-unknown-key", lambda w: ["train", w.write("k.yaml", "learning_rate: 1\n")], "k.yaml"),
    ("yaml-invalid", lambda w: ["train", w.write("i.yaml", "lr: [1\n")], "i.yaml line"),
    ("yaml-bad-value", lambda w: ["train", w.write("v.yaml", "warmup_ratio: 3\n")], "--warmup"),
    # -- data files: the file and the line
    (
        "data-missing",
        lambda w: w.train("--data", str(w.case / "missing.jsonl")),
        "missing.jsonl: file not found",
    ),
    (
        "data-bad-json-line",
        lambda w: w.train("--data", w.write("bad.jsonl", json.dumps(MC_ROWS[0]) + "\n{x\n")),
        "bad.jsonl line 2",
    ),
    (
        "data-extension",
        lambda w: w.train("--data", w.write("data.txt", "hello\n")),
        "data.txt: unsupported file type",
    ),
    (
        "data-csv-extra-column",
        lambda w: w.train("--data", w.write("bad.csv", "instruction,output\na,b,c\n")),
        "bad.csv row 1",
    ),
    (
        "data-json-not-list",
        lambda w: w.train("--data", w.write("obj.json", '{"instruction": "a"}')),
        "obj.json: expected a JSON list",
    ),
    (
        "eval-data-bad-answer",
        lambda w: w.train(
            "--eval-data",
            w.write("ans.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": "c"}\n'),
        ),
        "ans.jsonl line 1",
    ),
    # -- model directories
    ("model-empty-dir", lambda w: w.train("--model", w.model_copy("empty", keep=())), "empty"),
    (
        "model-config-garbage",
        lambda w: w.train("--model", w.model_copy("garbage", (), {"config.json": "{x"})),
        "config.json: not valid JSON",
    ),
    (
        "model-no-weights",
        lambda w: w.train("--model", w.model_copy("noweights")),
        "noweights: no weights",
    ),
    (
        "model-truncated-weights",
        lambda w: w.train(
            "--model",
            w.model_copy(
                "trunc",
                ("config.json", "tokenizer.json", "tokenizer_config.json"),
                {"model.safetensors": (Path(w.model) / "model.safetensors").read_bytes()[:5000]},
            ),
        ),
        "trunc: cannot load the weights",
    ),
    (
        "model-pickle-only",
        lambda w: w.train("--model", w.model_copy("pkl", extra={"pytorch_model.bin": TINY_BIN})),
        "only pickle weights (pytorch_model.bin)",
    ),
    (
        "model-custom-code",
        lambda w: w.train(
            "--model",
            w.model_copy(
                "custom",
                (),
                {"config.json": '{"model_type": "my_llm", "auto_map": {"AutoConfig": "x.C"}}'},
            ),
        ),
        "trust_remote_code",
    ),
    ("model-unknown-name", lambda w: w.train("--model", "no-such-model"), "no-such-model"),
    # -- adapters: damaged or foreign
    ("adapter-missing", lambda w: w.eval(str(w.case / "nothing")), "nothing not found"),
    (
        "adapter-bad-json",
        lambda w: w.eval(_adapter_file(w, "adapter_config.json", b"{")),
        "adapter_config.json is not valid JSON",
    ),
    (
        "adapter-json-list",
        lambda w: w.eval(w.adapter_config("a", lambda d: [d])),
        "adapter_config.json: expected a JSON object",
    ),
    (
        "adapter-unknown-key",
        lambda w: w.eval(w.adapter_config("a", _set("learning_rate", 1))),
        "learning_rate",
    ),
    (
        "adapter-newer-mola",
        lambda w: [
            "generate",
            "--adapter",
            w.adapter_config("a", _set("mola_version", "99.0")),
            "hi",
        ],
        "written by mola 99.0",
    ),
    (
        "adapter-bad-value",
        lambda w: w.eval(w.adapter_config("a", _set("r", "abc"))),
        "adapter_config.json: r: cannot read",
    ),
    (
        "adapter-bad-allocation",
        lambda w: w.eval(w.adapter_config("a", _set("allocation", {"num_experts": 2}))),
        "'allocation' must be",
    ),
    (
        "adapter-base-model-moved",
        lambda w: w.eval(w.adapter_config("a", _set("base_model_name_or_path", "/gone/model"))),
        "trained on the model /gone/model, which is not a directory here; pass its location",
    ),
    (
        "adapter-truncated-weights",
        lambda w: w.eval(w.adapter_bytes("a", lambda b: b[: len(b) // 2])),
        "adapter_model.safetensors is not a readable safetensors file",
    ),
    (
        "adapter-random-bytes",
        lambda w: [
            "generate",
            "--adapter",
            w.adapter_bytes("a", lambda b: os.urandom(len(b))),
            "hi",
        ],
        "adapter_model.safetensors is not a readable safetensors file",
    ),
    (
        "adapter-missing-tensor",
        lambda w: [
            "analyze",
            "--adapter",
            w.adapter_weights("a", _drop_first),
            "--weights-only",
            "--no-progress",
        ],
        "1 missing tensor",
    ),
    (
        "adapter-wrong-shape",
        lambda w: w.eval(w.adapter_weights("a", _reshape_first)),
        "has shape (3, 5) in the file",
    ),
    (
        "adapter-no-weights",
        lambda w: w.eval(_adapter_file(w, "adapter_model.safetensors", None)),
        "adapter_model.safetensors not found",
    ),
    (
        "init-from-damaged-adapter",
        lambda w: w.train("--init-from", w.adapter_bytes("a", lambda b: b[:200])),
        "adapter_model.safetensors is not a readable safetensors file",
    ),
    (
        "init-from-not-an-adapter",
        lambda w: w.train("--init-from", str(w.case)),
        "adapter_config.json not found",
    ),
    (
        "resume-damaged-checkpoint",
        lambda w: w.train("--resume", "--output", _damaged_run(w)),
        "checkpoint-1/adapter_model.safetensors is not a readable",
    ),
    (
        "resume-without-checkpoint",
        lambda w: w.train("--resume", "--output", _run_without_checkpoints(w)),
        "--resume: no checkpoint-N directory",
    ),
    # -- outputs: a finished run is not overwritten, unwritable outputs fail before the work
    (
        "train-into-finished-run",
        lambda w: w.train("--output", w.run),
        "already holds a finished run",
    ),
    ("train-output-is-file", lambda w: w.train("--output", w.write("out.txt", "x")), "out.txt"),
    (
        "train-output-under-file",
        lambda w: w.train("--output", w.write("f", "x") + "/sub"),
        "is a file",
    ),
    (
        "eval-output-is-file",
        lambda w: w.eval(w.run, "--output", w.write("o.json", "{}")),
        "o.json: is a file",
    ),
    (
        "eval-output-is-training-run",
        lambda w: w.eval(w.run, "--output", w.run),
        "holds a training run",
    ),
    (
        "analyze-output-is-file",
        lambda w: ["analyze", "--adapter", w.run, "--weights-only", "--output", w.write("p", "")],
        "--output",
    ),
    # -- other commands' options
    (
        "generate-temperature",
        lambda w: ["generate", "--adapter", w.run, "hi", "--temperature", "-1"],
        "--temperature",
    ),
    (
        "generate-max-new-tokens",
        lambda w: ["generate", "--adapter", w.run, "hi", "--max-new-tokens", "0"],
        "--max-new-tokens",
    ),
    ("eval-limit-0", lambda w: w.eval(w.run, "--limit", "0"), "--limit"),
    ("eval-batch-size-0", lambda w: w.eval(w.run, "--batch-size", "0"), "--batch-size"),
    ("demo-max-steps-0", lambda w: ["demo", "--max-steps", "0"], "--max-steps"),
    ("unknown-command", lambda w: ["frobnicate"], "unknown command 'frobnicate'"),
]


def _adapter_file(w: World, name: str, data: bytes | None) -> str:
    path = w.adapter("a")
    if data is None:
        (path / name).unlink()
    else:
        (path / name).write_bytes(data)
    return str(path)


def _run_without_checkpoints(w: World) -> str:
    path = w.case / "run"
    shutil.copytree(w.run, path)
    shutil.rmtree(path / "checkpoint-1")
    return str(path)


def _damaged_run(w: World) -> str:
    path = w.case / "run"
    shutil.copytree(w.run, path)
    weights = path / "checkpoint-1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return str(path)


@pytest.mark.parametrize("make_argv,culprit", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(world, tmp_path, make_argv, culprit):
    world.case = tmp_path
    argv = make_argv(world)
    before = snapshot(world.root, tmp_path)
    rc, _, err = world.runner(argv, tmp_path)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("mola: error: "), err
    assert culprit in lines[0], lines[0]
    assert snapshot(world.root, tmp_path) == before, "files changed or created"


def test_table_is_big_enough():
    assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)


def test_debug_adds_traceback_keeps_exit_2(world, tmp_path):
    world.case = tmp_path
    rc, _, err = world.runner(world.train("--lr", "inf", "--debug"), tmp_path)
    assert rc == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("mola: error: --lr")


def test_a_bug_is_not_a_user_error(monkeypatch):
    import mola.commands.eval as eval_command

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(eval_command, "run", broken)
    with pytest.raises(ZeroDivisionError):  # the interpreter prints it and exits 1
        main(["eval"])


def test_overwrite_replaces_a_finished_run(world, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(world.run, out)
    (out / "notes.txt").write_text("mine")
    world.case = tmp_path
    argv = world.train("--output", str(out), "--overwrite", "--save-steps", "0")
    rc, stdout, err = world.runner(argv, tmp_path)
    assert rc == 0, err
    assert not (out / "checkpoint-1").exists(), "the earlier run's checkpoints are removed"
    assert (out / "notes.txt").read_text() == "mine", "files mola did not write stay"
    assert "--data without --eval-data: no evaluation" in stdout
    assert "--save-steps 0: no checkpoints" in stdout
    assert "mola: 4 training examples" in stdout
    assert (out / "logs").is_dir() and not (out / "runs").exists()


def test_real_console_script(world, tmp_path):
    """The real ``mola`` executable behaves as the forked runner does."""
    world.case = tmp_path
    for argv, culprit in (
        (world.train("--lr", "inf"), "--lr"),
        (world.eval(world.adapter_config("a", lambda d: [d])), "expected a JSON object"),
    ):
        rc, _, err = real_mola(argv, tmp_path)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and culprit in lines[0], err


def test_demo_help_shows_the_demo_recipe():
    from mola.cli import build_parser
    from mola.commands.demo import DEMO_RECIPE

    text = " ".join(build_parser("demo").format_help().split())
    assert f"(default: {DEMO_RECIPE['max_steps']})" in text
    assert f"(default: {DEMO_RECIPE['output']})" in text
    assert f"(default: {DEMO_RECIPE['lr']})" in text
