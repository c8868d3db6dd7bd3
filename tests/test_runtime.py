"""Process-level helpers: the background import that overlaps torch._dynamo with data loading."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from trainer.runtime import imported_in_background


def _fresh_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_module_is_imported_on_another_thread_and_joined() -> None:
    out = _fresh_python(
        """
        import sys, threading
        import torch
        from trainer.runtime import imported_in_background

        seen = []

        class Spy:  # a finder that only notes which thread looks torch._dynamo up
            def find_spec(self, name, path=None, target=None):
                if name == "torch._dynamo":
                    seen.append(threading.current_thread() is threading.main_thread())
                return None

        sys.meta_path.insert(0, Spy())
        assert "torch._dynamo" not in sys.modules
        with imported_in_background("torch._dynamo"):
            pass
        print("main" if seen == [True] else "helper", "torch._dynamo" in sys.modules,
              threading.active_count())
        """
    )
    # Imported by the helper, finished when the block ends, and no thread left behind.
    assert out.split() == ["helper", "True", "1"]


def test_an_error_in_the_body_still_joins_the_helper() -> None:
    before = threading.active_count()
    with pytest.raises(ValueError), imported_in_background("json"):
        raise ValueError("the data could not be read")
    assert threading.active_count() == before


def test_a_failing_import_is_left_to_the_callers_own_import() -> None:
    with imported_in_background("trainer.no_such_module"):
        pass
    with pytest.raises(ModuleNotFoundError):
        import trainer.no_such_module  # noqa: F401
