"""``fastkd.measured_choice`` and the attention backend ``auto``: decided from timings on the running
machine, cached per machine + torch version + shape class in the user cache directory, never
measured for an explicit setting, a corrupt cache file ignored and rewritten."""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

import fastkd.models.attention as attention_module
from fastkd import measured_choice
from fastkd.models.attention import attention, resolve_backend, token_class
from fastkd.reporting import cpu_info

CPU = torch.device("cpu")


def _entries(cache: Path) -> dict:
    return json.loads((cache / measured_choice.FILE_NAME).read_text())


def test_tests_never_touch_the_users_cache():
    assert os.environ["FASTKD_CACHE_DIR"].startswith(tempfile.gettempdir())
    assert measured_choice.cache_dir() == Path(os.environ["FASTKD_CACHE_DIR"])


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTKD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert measured_choice.cache_dir() == tmp_path / "xdg" / "fastkd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert measured_choice.cache_dir() == tmp_path / "home" / ".cache" / "fastkd"


def test_cpu_info_reads_the_first_processors_model_and_isa(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx2 fma avx512_bf16 sse2\n\n"
                    "processor\t: 1\nflags\t: fpu\n")
    assert cpu_info(str(info)) == ("Some CPU 9000", ("avx2", "avx512_bf16", "fma"))
    assert cpu_info(str(tmp_path / "missing"))[1] == ()


def test_measure_times_every_candidate_after_a_warm_up():
    calls = []
    seconds = measured_choice.measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU)
    assert sorted(seconds) == ["a", "b"] and all(0 <= s < 1 for s in seconds.values())
    assert calls.count("a") == calls.count("b") == measured_choice.REPEATS + 1


@pytest.mark.parametrize("sdpa, math, expected", [(1.0, 2.0, "sdpa"), (2.0, 1.0, "math")])
def test_auto_follows_the_timings(fake_timings, sdpa, math, expected):
    fake_timings.seconds.update(sdpa=sdpa, math=math)
    assert resolve_backend("auto", CPU, torch.float32, tokens=17, grad=False) == expected
    q, k, v = torch.randn(3, 1, 2, 17, 8).unbind(0)  # no gradients: the same class
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend=expected))
    assert fake_timings.calls == [["math", "sdpa"]]


def test_one_measurement_per_class_and_the_class_key(fake_timings):
    """Token counts 17..32 share a class; another bucket, dtype (autocast included) or grad mode is
    another class."""
    assert [token_class(n) for n in (1, 5, 8, 9, 17, 32, 197, 5000)] == [8, 8, 8, 16, 32, 32, 256, 1024]
    for tokens in (17, 20, 32):
        resolve_backend("auto", CPU, torch.float32, tokens=tokens, grad=True)
    assert len(fake_timings.calls) == 1
    resolve_backend("auto", CPU, torch.float32, tokens=33, grad=True)
    resolve_backend("auto", CPU, torch.bfloat16, tokens=17, grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        resolve_backend("auto", CPU, torch.float32, tokens=17, grad=True)  # = bf16 above
    resolve_backend("auto", CPU, torch.float32, tokens=17, grad=False)
    assert len(fake_timings.calls) == 4
    section, = _entries(fake_timings.cache).values()
    assert sorted(section) == ["attention | bfloat16 train 32 tokens", "attention | float32 no-grad 32 tokens",
                               "attention | float32 train 32 tokens", "attention | float32 train 64 tokens"]


def test_the_cache_file_is_keyed_by_machine_and_torch_version(fake_timings, monkeypatch):
    fake_timings.seconds.update(sdpa=2.0, math=1.0)
    assert resolve_backend("auto", CPU, torch.float32, tokens=64) == "math"
    (section,) = _entries(fake_timings.cache)
    assert section == f"{measured_choice.machine(CPU)} | torch {torch.__version__}"
    assert section.startswith(f"cpu {cpu_info()[0]} [")

    # the same machine and version in a new process reads the file: no measurement, the file's choice
    measured_choice.forget()
    fake_timings.seconds.update(sdpa=1.0, math=2.0)
    assert resolve_backend("auto", CPU, torch.float32, tokens=64) == "math"
    assert len(fake_timings.calls) == 1

    # another torch version, another machine: measured anew, each in its own section
    measured_choice.forget()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert resolve_backend("auto", CPU, torch.float32, tokens=64) == "sdpa"
    measured_choice.forget()
    monkeypatch.setattr(measured_choice, "machine", lambda device: "cpu Other CPU [avx2 fma] x2")
    assert resolve_backend("auto", CPU, torch.float32, tokens=64) == "sdpa"
    assert len(fake_timings.calls) == 3
    assert len(_entries(fake_timings.cache)) == 3


def test_an_explicit_backend_wins_and_measures_nothing(fake_timings, monkeypatch):
    fake_timings.seconds.update(sdpa=2.0, math=1.0)
    q, k, v = torch.randn(3, 1, 2, 17, 8).unbind(0)
    for backend in ("sdpa", "math"):
        assert resolve_backend(backend, CPU, torch.bfloat16, tokens=17) == backend
        attention(q, k, v, backend=backend)
    monkeypatch.setenv("FASTKD_ATTENTION", "sdpa")
    attention(q, k, v)  # the environment's explicit default
    assert fake_timings.calls == [] and not fake_timings.cache.exists()
    assert resolve_backend("auto", CPU, torch.float32) == "auto"  # no token count: attention() decides per call


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"a": {"b": 3}}', ""])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(fake_timings, content):
    fake_timings.cache.mkdir()
    (fake_timings.cache / measured_choice.FILE_NAME).write_text(content)
    fake_timings.seconds.update(sdpa=2.0, math=1.0)
    assert resolve_backend("auto", CPU, torch.float32, tokens=8, grad=False) == "math"
    (section,) = _entries(fake_timings.cache).values()
    assert section == {"attention | float32 no-grad 8 tokens": {"choice": "math", "seconds": {"sdpa": 2.0, "math": 1.0}}}


def test_xformers_is_a_candidate_where_it_can_run(fake_timings, monkeypatch):
    monkeypatch.setattr(attention_module, "_xformers_unavailable_reason", lambda device: None)
    fake_timings.seconds.update(sdpa=2.0, math=2.0, xformers=1.0)
    assert resolve_backend("auto", CPU, torch.float32, tokens=8) == "xformers"
    assert fake_timings.calls == [["math", "sdpa", "xformers"]]


def test_the_measured_candidates_run_eagerly_without_the_global_rng(monkeypatch, tmp_path):
    """The real candidates (forward + backward) run; the step's random stream is not moved."""
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path))
    measured_choice.forget()
    state = torch.get_rng_state()
    name = resolve_backend("auto", CPU, torch.float32, tokens=12, grad=True)
    measured_choice.forget()
    assert name in ("sdpa", "math") and torch.equal(torch.get_rng_state(), state)
    entry = _entries(tmp_path)[f"{measured_choice.machine(CPU)} | torch {torch.__version__}"]
    assert entry["attention | float32 train 16 tokens"]["choice"] == name


@pytest.mark.parametrize("dynamic", [False, True])
def test_auto_inside_a_fullgraph_compile_is_a_trace_time_constant(fake_timings, dynamic):
    """Inside a trace the class is ``compiled`` (the token count may be symbolic); the decision runs
    eagerly while dynamo traces and the graph holds the chosen backend, no break, no guard."""
    fake_timings.seconds.update(sdpa=2.0, math=1.0)
    q, k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))
    if dynamic:
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 2)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v, backend="math"))
    section, = _entries(fake_timings.cache).values()
    assert f"attention | float32 train {attention_module.COMPILED_TOKENS} tokens" in section


def test_a_recorded_choice_that_cannot_run_any_more_is_measured_again(fake_timings, monkeypatch):
    """xformers recorded while it was installed, then uninstalled: the class is measured anew."""
    monkeypatch.setattr(attention_module, "_xformers_unavailable_reason", lambda device: None)
    fake_timings.seconds.update(xformers=0.5)
    assert resolve_backend("auto", CPU, torch.float32, tokens=8, grad=False) == "xformers"
    measured_choice.forget()
    monkeypatch.setattr(attention_module, "_xformers_unavailable_reason", lambda device: "not installed")
    fake_timings.seconds.update(sdpa=2.0, math=1.0)
    assert resolve_backend("auto", CPU, torch.float32, tokens=8, grad=False) == "math"
    assert fake_timings.calls == [["math", "sdpa", "xformers"], ["math", "sdpa"]]


def test_auto_on_meta_tensors_measures_nothing(fake_timings):
    q = torch.empty(2, 3, 17, 8, device="meta")
    assert resolve_backend("auto", q.device, q.dtype, tokens=17) == "sdpa"
    assert attention(q, q, q).shape == (2, 3, 17, 8) and fake_timings.calls == []
