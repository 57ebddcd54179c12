"""The C++ extension's backend: `ops` (the op functions, "cpu" and "cuda" in the dispatcher's
table), `fakes` (their fake implementations and se_excite's autograd) and `build` (finding,
building on first use and loading the extension). Importing it builds nothing."""
