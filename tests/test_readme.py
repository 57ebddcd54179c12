"""The README's example runs as written."""
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    max_abs_diff = float(re.search(r"tensor\(([-0-9.e+]+)", proc.stdout).group(1))
    assert max_abs_diff < 1e-4, proc.stdout


def test_first_screen_says_what_a_newcomer_needs():
    """The first 40 lines: the compiler the first call needs, that it compiles for about a
    minute, how to install, and the example (without TRITON_INTERPRET: the CPU path does not
    use Triton)."""
    first_screen = "\n".join(README.read_text().splitlines()[:40])
    assert "C++20 compiler with OpenMP" in first_screen
    assert "first call compiles for about a minute" in first_screen
    assert "pip install ." in first_screen
    example = re.search(r"```python\n(.*?)```", first_screen, re.S)
    assert example and "TRITON_INTERPRET" not in example.group(1)
