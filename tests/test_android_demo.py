"""The Android demo's plain-Kotlin core: its unit tests run here (kotlinc from npm, JUnit from
Debian) on a `.litertlm` our exporter wrote, and its chat template is held to the Python runtime's
by a golden file this module writes from `runtime.chat.render_chat`."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from runtime.chat import constants, render_chat

CORE = ROOT / "android_demo" / "core"
GOLDEN = CORE / "src" / "test" / "resources" / "golden_prompts.json"

U, A, S = "user", "assistant", "system"
CASES = {
    "one user turn": [(U, "The capital of France is")],
    "system prepended to the first user turn": [(S, "Answer in French.  "), (U, "Hello")],
    "three turns": [(U, "Hi"), (A, "Hello! How can I help?"), (U, "Tell me a joke.")],
    "python whitespace stripped": [(U, "\x1c\x85\u3000 spaced\ttext\n\n\u00a0\u2028")],
    "inner newlines kept": [(U, "line one\n\nline two"), (A, "ok\n"), (U, "  again  ")],
    "turn markers typed by the user stay text": [(U, "say <end_of_turn> now<start_of_turn>")],
    "unicode": [(U, "日本語で答えて 😀"), (A, "はい、どうぞ。"), (U, "Ça va ? — ¿qué?")],
    "empty user text": [(U, "")],
    "zero width space is not whitespace": [(U, "\u200bword\u200b")],
    "system and several turns": [(S, "You are terse."), (U, "a"), (A, "b"), (U, "c"), (A, "d"),
                                 (U, "e")],
    "no messages": [],
    "only a system message": [(S, "Be nice.")],
    "assistant first": [(A, "Hi"), (U, "Hello")],
    "two user turns in a row": [(U, "Hi"), (U, "Hello?")],
    "system in the middle": [(U, "Hi"), (S, "Be nice.")],
}


def golden_cases() -> list[dict]:
    out = []
    for name, turns in CASES.items():
        messages = [{"role": r, "content": c} for r, c in turns]
        case = {"name": name, "messages": messages}
        try:
            case["prompt"] = render_chat(messages)
        except ValueError as e:
            case["error"] = str(e)
        out.append(case)
    # the template's strings, which the Kotlin core spells as constants
    return out + [{"name": "template constants", "constants": constants()}]


def test_golden_prompts_are_the_python_runtimes():
    want = golden_cases()
    if os.environ.get("GEMMA_AOT_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(want, indent=1, ensure_ascii=True) + "\n")
    assert json.loads(GOLDEN.read_text()) == want, (
        "the Python runtime's chat template changed: regenerate the Kotlin core's golden file "
        "with GEMMA_AOT_WRITE_GOLDEN=1 pytest tests/test_android_demo.py, then fix the Kotlin side")
    assert sum("error" in c for c in want) == 5


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """The bundle as a user makes it for the app: `compile.export --android-demo DIR`."""
    tmp = tmp_path_factory.mktemp("android")
    r = subprocess.run([sys.executable, "-m", "compile.export", "--checkpoint",
                        "random:gemma3-270m-tiny", "--prefill-lengths", "4,8", "--max-context", "64",
                        "--out", str(tmp / "art"), "--android-demo", str(tmp / "model")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # the converter's and LiteRT's own logging (absl, accelerator registry) is not shown
    assert not [line for line in r.stderr.splitlines()
                if line.startswith(("INFO:", "WARNING:", "I0000", "W0000"))], r.stderr
    bundle = tmp / "model" / "gemma3-270m-tiny-int8.litertlm"
    assert (f"adb push {bundle} /sdcard/Android/data/dev.gemmaaot.chat/files/"
            f"gemma3-270m-tiny-int8.litertlm") in r.stdout
    m = json.loads((tmp / "art" / "manifest.json").read_text())
    assert set(m["artifacts"]) == {"tflite"}              # --android-demo implies the tflite target
    assert bundle.read_bytes() == (tmp / "art" / "tflite" / bundle.name).read_bytes()
    return bundle, tmp / "art" / "tflite" / "model.tflite"


def test_kotlin_core_unit_tests(tiny_bundle, tmp_path):
    bundle, tflite = tiny_bundle
    where = subprocess.run(["bash", str(CORE / "tools.sh"), "--where"], capture_output=True,
                           text=True, timeout=60)
    assert where.returncode == 0, where.stderr   # `make test` installs them first (`make tools`)
    home = where.stdout.strip().splitlines()[-1]
    kotlinc = f"{home}/bin/kotlinc"
    libs = [f"{home}/lib/kotlin-test.jar", f"{home}/lib/kotlin-test-junit.jar",
            "/usr/share/java/junit4.jar", "/usr/share/java/hamcrest-core.jar"]
    jar = tmp_path / "core.jar"

    def run(*cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        return r.stdout

    # the core and its tests in one compiler run (a JVM start and compiler warm-up is ~10 s of
    # CPU), warnings as errors in both
    run(kotlinc, "-Werror", str(CORE / "src" / "main" / "kotlin"),
        str(CORE / "src" / "test" / "kotlin"), "-cp", ":".join(libs), "-d", str(jar))
    classes = sorted(p.stem for p in (CORE / "src" / "test" / "kotlin").rglob("*Test.kt"))
    out = run("java", f"-Dgolden={GOLDEN}", f"-Dlitertlm={bundle}", f"-Dtflite={tflite}",
              "-cp", ":".join([str(jar), f"{home}/lib/kotlin-stdlib.jar"] + libs),
              "org.junit.runner.JUnitCore", *[f"dev.gemmaaot.core.{c}" for c in classes])
    written = sum(p.read_text().count("@Test\n") for p in (CORE / "src" / "test").rglob("*.kt"))
    ran = re.search(r"OK \((\d+) tests\)", out)
    assert ran and int(ran.group(1)) == written >= 20, out[-3000:]
