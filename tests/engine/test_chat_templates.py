"""Chat templates: byte-identical prompts, and hostile templates bounded on every path that renders.

A GGUF's chat template renders in a worker process (llmctl/chat_template.py,
llmctl/template_worker.py) under time, memory, output, template-size and
recursion budgets. These tests prove the prompts are the ones llama-cpp-python
renders, that each attack from issue 11 ends in a one-line error within the
budgets (run, chat, bench's run-path extras, a Llama built outside
``load_llama`` as bench's measuring and tune's trials load it, serve), that
loading compiles nothing, and that the worker never outlives its parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import llmctl.engine.llama  # noqa: F401 - installs the bounded formatter, as every command does
from llmctl.engine import template_worker
from llmctl.engine.chat_template import DEFAULT_BUDGETS, BoundedChatFormatter, Budgets, ChatTemplateError, TemplateWorker
from tests.support.examples import examples

EXE = str(Path(sys.executable).with_name("llmctl"))

# The attacks of issue 11, as templates.
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
DOUBLING = "{% set ns = namespace(x='AB') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}"
MULTIPLY = "{{ 'A' * 20000000000 }}"  # folded as a constant: this one blew up while compiling, i.e. loading
RECURSIVE_MACRO = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
HUGE = "{# " + "x" * 16_000_000 + " #}{{ messages[0]['content'] }}"  # 16 MB
OUTPUT_FLOOD = "{% for i in range(100000) %}{% for j in range(100000) %}0123456789abcdef{% endfor %}{% endfor %}"
CENTER = "{{ 'x'|center(10000000000) }}"

ATTACKS = {  # name: (template, what the error may say)
    "nested-loops": (NESTED_LOOPS, ("time budget",)),
    "doubling": (DOUBLING, ("memory budget", "time budget")),  # ~1-4 s to reach 512 MiB, with the machine's load
    "multiply": (MULTIPLY, ("memory budget",)),
    "recursive-macro": (RECURSIVE_MACRO, ("recursed deeper",)),
    "huge-16MB": (HUGE, ("over the limit",)),
}


@pytest.fixture(scope="module")
def demo_template(demo_model: Path) -> str:
    from llmctl import gguf

    _, info = gguf.read_model([demo_model])
    assert info.chat_template and "<|im_start|>" in info.chat_template
    return info.chat_template


def _original(template: str, **kwargs):
    """llama-cpp-python's own formatter (importing llama_cpp installs ours in its place)."""
    import llama_cpp  # noqa: F401

    assert BoundedChatFormatter.original is not None  # install() saw llama_cpp's own class
    return BoundedChatFormatter.original(template, "<|im_end|>", "<s>", stop_token_ids=[2], **kwargs)


def _bounded(template: str, worker: TemplateWorker | None = None, **kwargs) -> BoundedChatFormatter:
    formatter = BoundedChatFormatter(template, "<|im_end|>", "<s>", stop_token_ids=[2], **kwargs)
    if worker is not None:
        formatter.worker = worker
    return formatter


@pytest.fixture(scope="module")
def worker():
    shared = TemplateWorker()
    yield shared
    shared.close()


# --- the prompts are llama-cpp-python's, byte for byte --------------------------------------

FEATURES = [
    # tojson with each of its arguments, on tools and messages
    "{{ tools|tojson }}|{{ messages|tojson(indent=2) }}|{{ {'b': 1, 'a': [1.5, none, true]}|tojson(sort_keys=true, separators=(',', ':')) }}"
    "|{{ 'é\u2028'|tojson }}|{{ 'é'|tojson(ensure_ascii=true) }}",
    # loop controls, namespaces, macros, whitespace control, trim_blocks and lstrip_blocks
    "{%- set ns = namespace(n=0) -%}\n{% macro show(m) -%}\n  [{{ m.role }}] {{ m.content }}\n{%- endmacro %}\n"
    "{% for m in messages %}\n    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
    "    {% set ns.n = ns.n + 1 %}{{ show(m) }}\n    {% if loop.index > 3 %}{% break %}{% endif %}\n{% endfor %}\n"
    "count={{ ns.n }}\n",
    # the {% generation %} pass-through, bos/eos, add_generation_prompt, the other variables
    "{{ bos_token }}{% for m in messages %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% endfor %}"
    "{% if add_generation_prompt %}<gen>{% endif %}{{ functions }}{{ function_call }}{{ tool_choice }}|{{ strftime_now('%Y') }}",
    # content that is not a string, and values the template does not define
    "{% for m in messages %}{{ m.content is string }}:{{ m.content|string }}:{{ m.name|default('-') }};{% endfor %}{{ nothing }}",
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "héllo 🌍 \u2028 \x00 \x1b[31m <|im_end|>"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "  trailing spaces and\nnew lines\n\n"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "parts"}], "name": "ada"},
    ],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("feature", ["demo", *range(len(FEATURES))])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_prompts_are_byte_identical_to_llama_cpp_python(worker, demo_template: str, feature, conversation: int, add_generation_prompt: bool) -> None:
    template = demo_template if feature == "demo" else FEATURES[feature]
    messages = CONVERSATIONS[conversation]
    if feature == "demo":
        messages = [m for m in messages if isinstance(m["content"], str)]  # SmolLM2's template concatenates strings
    extra = {"tools": TOOLS, "tool_choice": "auto", "functions": None}
    expected = _original(template, add_generation_prompt=add_generation_prompt)(messages=messages, **extra)
    got = _bounded(template, worker, add_generation_prompt=add_generation_prompt)(messages=messages, **extra)
    assert got.prompt == expected.prompt
    assert (got.stop, got.added_special) == (expected.stop, expected.added_special)
    for tokens, stops in (([5, 2], True), ([2, 5], False)):
        assert got.stopping_criteria[0](tokens, None) is stops
        assert expected.stopping_criteria[0](tokens, None) is stops


def test_raise_exception_is_the_same_value_error(worker) -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate ' ~ messages|length) }}{% endif %}"
    messages = [{"role": "assistant", "content": "x"}]
    with pytest.raises(ValueError) as expected:
        _original(template)(messages=messages)
    with pytest.raises(ValueError) as got:
        _bounded(template, worker)(messages=messages)
    assert str(got.value) == str(expected.value) == "Conversation roles must alternate 1"


def test_the_worker_environment_is_llama_cpp_pythons() -> None:
    """Catches drift when llama-cpp-python changes how it sets Jinja up (compare its source to template_worker)."""
    original = _original("{{ x }}")._environment.environment
    ours = template_worker._environment("{{ x }}").environment
    assert type(ours) is type(original)
    for attribute in ("trim_blocks", "lstrip_blocks", "keep_trailing_newline", "autoescape", "optimized", "undefined",
                      "newline_sequence", "block_start_string", "variable_start_string", "comment_start_string", "finalize"):  # fmt: skip
        assert getattr(ours, attribute) == getattr(original, attribute), attribute
    assert sorted(ours.filters) == sorted(original.filters) and sorted(ours.tests) == sorted(original.tests)
    assert sorted(ours.globals) == sorted(original.globals)
    assert sorted(type(e).__name__ for e in ours.extensions.values()) == sorted(type(e).__name__ for e in original.extensions.values())
    assert sorted(tag for e in ours.extensions.values() for tag in e.tags) == sorted(tag for e in original.extensions.values() for tag in e.tags)
    assert BoundedChatFormatter.tojson is BoundedChatFormatter.original.tojson  # the multimodal handlers' helpers stay reachable


@pytest.mark.slow
def test_every_llama_gets_the_bounded_formatter_even_when_llama_cpp_is_imported_later() -> None:
    code = (
        "import sys, llmctl.engine.llama\n"
        "assert 'llama_cpp' not in sys.modules, 'llmctl.engine.llama must stay light'\n"
        "import llama_cpp\n"
        "from llama_cpp import llama_chat_format\n"
        "print(llama_chat_format.Jinja2ChatFormatter.__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "BoundedChatFormatter"


# --- budgets ---------------------------------------------------------------------------------

QUICK = Budgets(time_s=3.0, memory_bytes=128 * 2**20)  # smaller than the defaults: quick on a loaded machine


@pytest.mark.parametrize(
    "template, problem",
    [
        (NESTED_LOOPS, "rendering took longer than its 3 s time budget"),
        (DOUBLING, "rendering needed more than its 128 MiB memory budget"),
        (MULTIPLY, "rendering needed more than its 128 MiB memory budget"),
        (CENTER, "rendering needed more than its 128 MiB memory budget"),
        (RECURSIVE_MACRO, "it recursed deeper than the renderer's limit of 1000 frames"),
        (OUTPUT_FLOOD, "the rendered prompt grew past its 8,388,608-character size budget"),
        (HUGE, f"the template has {len(HUGE):,} characters, over the limit of 524,288"),
        ("{{ 1 + 'a' }}", "TypeError: unsupported operand type(s) for +: 'int' and 'str'"),
        ("{% for %}", "TemplateSyntaxError: Expected an expression, got 'end of statement block'"),
        ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "SecurityError: access to attribute '__init__' of 'type' object is unsafe."),
    ],
    ids=["nested-loops", "doubling", "multiply", "center", "recursive-macro", "output-flood", "huge", "type-error", "syntax", "escape"],
)
def test_a_hostile_template_ends_in_its_error_and_the_worker_recovers(template: str, problem: str) -> None:
    worker = TemplateWorker(QUICK)
    try:
        start = time.monotonic()
        with pytest.raises(ChatTemplateError) as caught:
            _bounded(template, worker)(messages=[{"role": "user", "content": "hi"}])
        assert time.monotonic() - start < QUICK.time_s + 20  # the budget, plus a respawn on a loaded machine
        assert caught.value.message == f"the model's chat template failed: {problem}"
        assert "--chat-format" in caught.value.hint and "--raw" in caught.value.hint
        # the same worker (respawned if it had to be killed) renders the next template normally
        assert _bounded("{{ messages[0]['content'] }}!", worker)(messages=[{"role": "user", "content": "hi"}]).prompt == "hi!"
    finally:
        worker.close()


def test_loading_compiles_nothing_and_starts_nothing() -> None:
    start = time.monotonic()
    formatter = _bounded(MULTIPLY)  # what Llama.__init__ does for each tokenizer.chat_template* entry
    formatter.to_chat_handler()
    assert time.monotonic() - start < 1
    assert formatter.worker.pid is None


def test_the_default_budgets_are_documented() -> None:
    text = (Path(__file__).parents[2] / "docs" / "chat-templates.md").read_text()
    b = DEFAULT_BUDGETS
    for figure in (f"{b.time_s:g} s", f"{b.memory_bytes // 2**20} MiB", f"{b.output_chars // 2**20} Mi", f"{b.template_chars // 1024} Ki", f"{b.recursion}"):
        assert figure in text, figure


# --- property-based: every composed template ends within the budget --------------------------

FUZZ = Budgets(time_s=1.0, output_chars=1 << 20, memory_bytes=256 << 20)


def _pieces() -> st.SearchStrategy[str]:
    leaf = st.sampled_from([
        "{{ messages[0]['content'] }}", "{{ ns.x }}", "{% set ns.x = ns.x ~ ns.x %}", "{{ ns.x * 1000 }}",
        "{{ 'A' * 100000000 }}", "{{ ns.x|center(50000000) }}", "{{ ns.x|indent(100000000) }}", "{{ range(10)|list }}",
        "{{ f(1) }}", "{{ messages|tojson }}", "{{ raise_exception('no') }}", "{{ ns.x|length }}", "{{ 2 ** 1000 }}",
        "{{ (ns.x ~ ns.x)|replace('A', ns.x) }}", "{{ undefined_thing.attr }}", "{{ 1 / 0 }}", "x",
    ])  # fmt: skip
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.tuples(st.integers(0, 100000), inner).map(lambda t: f"{{% for i in range({t[0]}) %}}{t[1]}{{% endfor %}}"),
            st.tuples(inner, inner).map(lambda t: t[0] + t[1]),
            inner.map(lambda body: "{% if messages %}" + body + "{% endif %}"),
        ),
        max_leaves=6,
    )


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=_pieces())
def test_fuzzed_hostile_templates_end_within_the_budget(fuzz_worker: TemplateWorker, body: str) -> None:
    template = "{% set ns = namespace(x='AB') %}{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}" + body
    start = time.monotonic()
    try:
        prompt = _bounded(template, fuzz_worker)(messages=[{"role": "user", "content": "hi"}]).prompt
        assert len(prompt) <= FUZZ.output_chars
        event("rendered")
    except ChatTemplateError as exc:
        assert exc.message.startswith("the model's chat template failed: ")
        event(exc.problem.split(":")[0] if "budget" not in exc.problem else exc.problem)
    except ValueError as exc:
        assert str(exc) == "no"  # the template's raise_exception
        event("raise_exception")
    assert time.monotonic() - start < FUZZ.time_s + 20


@pytest.fixture(scope="module")
def fuzz_worker():
    shared = TemplateWorker(FUZZ)
    yield shared
    shared.close()


# --- the worker never outlives its parent ---------------------------------------------------


@pytest.mark.slow
def test_the_worker_dies_with_its_parent_even_mid_render() -> None:
    code = (
        "import sys\n"
        "from llmctl.engine.chat_template import TemplateWorker, Budgets\n"
        "w = TemplateWorker(Budgets(time_s=600))\n"
        "w.wait_ready()\n"
        "print(w.pid, flush=True)\n"
        f"w.render({NESTED_LOOPS!r}, {{'messages': [{{'content': 'x'}}], 'eos_token': '', 'bos_token': '', 'add_generation_prompt': True,"
        " 'functions': None, 'function_call': None, 'tools': None, 'tool_choice': None, 'kwargs': {}})\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        time.sleep(1)  # it is spinning in the nested loops now
        assert _alive(pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- every path that renders, with real models ------------------------------------------------


@pytest.fixture(scope="module")
def hostile_models(tmp_path_factory, demo_model: Path) -> dict[str, Path]:
    from tests.support.loadable_models import build

    return {name: build(demo_model, tmp_path_factory.mktemp(name), "tiny-llama", chat_template=template) for name, (template, _) in ATTACKS.items()}


MEASURE = """
import json, resource, subprocess, sys, time
argv, stdin = json.loads(sys.argv[1])
start = time.monotonic()
r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=300)
print(json.dumps({"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "seconds": time.monotonic() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def _measure(argv: list[str], stdin: str | None = None) -> dict:
    """Run a command; its exit code, output, wall time and the peak RSS of it and its children (the worker)."""
    r = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([argv, stdin])], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "chat"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_run_and_chat_end_a_hostile_template_with_one_bounded_error(hostile_models: dict[str, Path], command: str, attack: str) -> None:
    model = str(hostile_models[attack])
    argv = [EXE, "run", model, "hello", "--max-tokens", "2"] if command == "run" else [EXE, "chat", model, "--max-tokens", "2"]
    r = _measure(argv, "hello\n" if command == "chat" else None)
    assert r["rc"] == 1, r
    lines = r["stderr"].strip().splitlines()
    assert lines[0].startswith("error: "), r["stderr"]
    if "not a valid GGUF model" not in lines[0]:  # a header reader may refuse a 16 MB string before any template runs
        assert lines[0].startswith("error: the model's chat template failed: ") and any(said in lines[0] for said in ATTACKS[attack][1]), r["stderr"]
        assert lines[1].startswith("hint: ") and "--chat-format" in lines[1], r["stderr"]
    assert len(lines) == 2 and "Traceback" not in r["stderr"] and "unexpected" not in r["stderr"], r["stderr"]
    assert r["seconds"] < 60, r  # the 5 s budget, a load and a respawn, on a loaded 2-core machine
    assert r["peak_rss"] < 1.5 * 2**30, r


@pytest.mark.slow
def test_run_with_raw_or_a_chat_format_never_renders_the_template(hostile_models: dict[str, Path]) -> None:
    r = _measure([EXE, "run", str(hostile_models["nested-loops"]), "hello", "--max-tokens", "2", "--chat-format", "chatml"])
    assert r["rc"] == 0 and r["seconds"] < 60, r


@pytest.mark.slow
def test_a_llama_built_directly_loads_a_bomb_template_without_compiling_it(hostile_models: dict[str, Path]) -> None:
    """Any llama_cpp.Llama in the process, even one built without llmctl's engine (bench's and tune's bare
    ``load_llama`` models, a library user's): loading must stay cheap, rendering bounded."""
    code = (
        "import sys, time, llmctl.engine.llama, llama_cpp\n"
        "from llmctl.engine.chat_template import ChatTemplateError\n"
        "start = time.monotonic()\n"
        "llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=2, verbose=False)\n"
        "print('loaded', round(time.monotonic() - start, 2), flush=True)\n"
        "try:\n"
        "    llm.create_chat_completion([{'role': 'user', 'content': 'hi'}], max_tokens=2)\n"
        "except ChatTemplateError as exc:\n"
        "    print(exc.message)\n"
    )
    r = _measure([sys.executable, "-c", code, str(hostile_models["multiply"])])
    assert r["rc"] == 0, r
    lines = r["stdout"].splitlines()
    assert lines[0].startswith("loaded") and float(lines[0].split()[1]) < 30, r
    assert lines[1] == "the model's chat template failed: rendering needed more than its 512 MiB memory budget", r
    assert r["peak_rss"] < 1.5 * 2**30 and r["seconds"] < 60, r


@pytest.mark.slow
def test_bench_extras_report_the_template_and_the_bench_still_runs(hostile_models: dict[str, Path]) -> None:
    r = _measure([EXE, "bench", str(hostile_models["nested-loops"]), "-p", "16", "-n", "4", "-r", "1", "-o", "json"])
    assert "Traceback" not in r["stderr"] and "unexpected" not in r["stderr"], r["stderr"]
    assert "chat template failed" in r["stdout"] + r["stderr"], r
    assert "time budget" in r["stdout"] + r["stderr"], r
    assert r["seconds"] < 120 and r["peak_rss"] < 1.5 * 2**30, r


@pytest.mark.slow
def test_the_demo_models_replies_are_unchanged(demo_model: Path, demo_template: str) -> None:
    """The same greedy reply and prompt tokens through the bounded formatter as through llama-cpp-python's own."""
    import llama_cpp

    llm = llama_cpp.Llama(str(demo_model), n_ctx=512, n_threads=2, verbose=False, seed=1)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    assert isinstance(llm._chat_handlers[llm.chat_format].chat_formatter, BoundedChatFormatter)
    ours = llm.create_chat_completion(messages, temperature=0, max_tokens=12, seed=1)
    llm._chat_handlers[llm.chat_format] = _original(demo_template).to_chat_handler()
    theirs = llm.create_chat_completion(messages, temperature=0, max_tokens=12, seed=1)
    assert ours["choices"][0]["message"] == theirs["choices"][0]["message"]
    assert ours["usage"] == theirs["usage"]
    llm.close()


# --- serve -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_answers_a_hostile_template_with_an_error_and_keeps_serving(tmp_path: Path, hostile_models: dict[str, Path], demo_model: Path) -> None:
    """llama-server renders a model's template while it loads, without a budget: serve checks the
    template within llmctl's budgets first, so a looping or exploding one is a quick 500 and
    never a child hung in its load (holding every load queued behind it)."""
    from tests.serve.test_serve import Server

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "LLMCTL_HOME": str(home)}
    for name, path in (("hostile", hostile_models["nested-loops"]), ("bomb", hostile_models["multiply"]), ("demo", demo_model)):
        subprocess.run([EXE, "import", str(path), "--name", name], env=env, check=True, capture_output=True)
    server = Server(home, "demo", "--ctx", "1024")
    try:
        for model in ("hostile", "bomb"):
            start = time.monotonic()
            status, body, _ = server.raw(
                "POST", "/v1/chat/completions", json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
            )
            assert status == 500 and "chat template failed" in body["error"]["message"], (status, body)
            assert time.monotonic() - start < 60
        # streamed: refused the same way, before any stream begins
        request = urllib.request.Request(server.url + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": "hostile", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode())  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                events = response.read().decode()
        except urllib.error.HTTPError as exc:
            events = exc.read().decode()
        assert "chat template failed" in events, events
        # the other model still answers, nothing stays busy, and stop works
        reply = server.client().chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0)
        assert reply.choices[0].message.content
        status, ps, _ = server.raw("GET", "/api/ps")
        assert status == 200, ps
        assert [(m["name"], m["busy"]) for m in ps["models"]] == [("demo", 0)], ps  # no child was left loading a hostile template
        r = subprocess.run([EXE, "stop", "demo", "--server", server.url], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
