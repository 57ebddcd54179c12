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
