"""Run fuzz cases in a child process (tests/test_fuzz.py): one JSON line per case on the results file.

    python fuzz_child.py CASES.json RESULTS.jsonl FIRST

Each case is {"id", "path", "action"}; action "parse" opens the file with GGUFFile, "load" calls
gguf_flash.load and, if that succeeds, generates two greedy tokens and renders the chat template (a
file the validators accept must also run). A "start" line is written (and flushed) before each case, so the parent knows which case was
running if this process dies (a crash of the interpreter) or hangs (the parent kills it). faulthandler
prints the Python stack of a crash on stderr. Python-side allocations are measured with tracemalloc
(numpy reports its buffers to it): the peak of each case, minus the peak of the intact file, is
reported so the parent can check that no declared size was allocated before being checked. The time a
case spent in first-run kernel compiles (firstrun.ensure_compiled's child, for a type set the warm-up
did not have: a flipped tensor type can leave a valid file of new types) is reported apart, as
"compile_seconds", and the case's alarm is paused meanwhile: on an empty kernel cache such a compile
took more than the 10 s a case gets. The parent's own timeout still bounds the whole child.
"""

import faulthandler
import json
import signal
import sys
import time
import tracemalloc

faulthandler.enable()


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(case):
    import gguf_flash
    from gguf_flash.gguf_file import GGUFFile
    if case["action"] == "parse":
        f = GGUFFile(case["path"])
        f.close()
    else:
        kw = case.get("load_kw", {})
        llm = gguf_flash.load(case["path"], **kw)
        llm.generate("hi", n_predict=2)
        llm.chat_prompt([{"role": "user", "content": "hi"}])


_compile_s = [0.0]


def _count_compiles():
    """Wrap firstrun.ensure_compiled (every caller goes through the module) to add up its time."""
    from gguf_flash import firstrun
    real = firstrun.ensure_compiled

    def timed(*a, **kw):
        left = signal.alarm(0)
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            _compile_s[0] += time.perf_counter() - t0
            if left:
                signal.alarm(left)

    firstrun.ensure_compiled = timed


def main():
    cases_path, results_path, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    _count_compiles()
    cases = json.load(open(cases_path))
    from gguf_flash.errors import GGUFFlashError
    out = open(results_path, "a")
    # warm up: imports, numba's cache, the tokenizer library, on the intact files
    for case in cases:
        if case.get("warmup"):
            run_case(case)
    signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    for case in cases[first:]:
        if case.get("warmup"):
            continue
        out.write(json.dumps({"start": case["id"]}) + "\n")
        out.flush()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        _compile_s[0] = 0.0
        t0 = time.perf_counter()
        signal.alarm(case.get("timeout", 10))
        try:
            run_case(case)
            outcome, message = "ok", ""
        except CaseTimeout:
            outcome, message = "hang", "timed out in Python code"
        except GGUFFlashError as e:
            outcome, message = "gguf:" + type(e).__name__, str(e)
        except BaseException as e:  # noqa: B036 - the point is to see anything else
            import traceback
            outcome = "other:" + type(e).__name__
            message = f"{e!r} | " + traceback.format_exc(limit=-3).replace("\n", " | ")
        finally:
            signal.alarm(0)
        peak = tracemalloc.get_traced_memory()[1] - base
        out.write(json.dumps({"id": case["id"], "outcome": outcome, "message": message[:1500],
                              "seconds": time.perf_counter() - t0, "compile_seconds": _compile_s[0],
                              "peak": peak}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
