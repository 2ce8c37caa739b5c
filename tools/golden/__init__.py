"""Golden files from the official code: ``python -m tools.golden --dit PATH --sit PATH --repa PATH --platonic PATH
[--irepa PATH] --out tests/data/golden``.

Each part module (``models``, ``losses``, ``metrics``, ``sampling``, ``spatial``, ``reg``, ``haste``; any may be absent)
has ``write(out_dir: Path, repos: dict[str, Path]) -> list[Path]``; ``repos`` maps "dit", "sit", "repa",
"platonic", "irepa", "reg", "haste" to checkouts outside this repository (None when not given, and the part
then skips what needs it with a notice). ``tests/test_golden.py`` compares this project against the files.
"""
