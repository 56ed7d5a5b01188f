"""README surgery: a matrix's block between ``<!-- results:<matrix>:begin -->`` and ``... :end -->`` (else the
default ``<!-- results:begin -->`` block) replaced by a generated table."""
import re
from pathlib import Path

from ..errors import AttnlabError
from ..files import atomic_write_text

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def markers(matrix_name: str | None = None) -> tuple[str, str]:
    """A README block's markers: ``<!-- results:begin -->`` or, for one matrix, ``<!-- results:NAME:begin -->``."""
    tag = f"results:{matrix_name}" if matrix_name else "results"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def update_readme(readme_path, block: str, matrix_name: str | None = None, fallback: bool = True) -> None:
    """Replace the matrix's own block (``<!-- results:NAME:begin -->``) if the README has one, else (with
    ``fallback``) the default block."""
    path = Path(readme_path)
    text, pattern, (begin, end) = _find_block(path, matrix_name, fallback)
    text = pattern.sub(lambda _: f"{begin}\n{block}\n{end}", text, count=1)
    atomic_write_text(path, text, "README")


def check_readme(readme_path, matrix_name: str | None = None, fallback: bool = True) -> None:
    """The one-line error ``update_readme`` would give, raised before a script writes anything else."""
    _find_block(Path(readme_path), matrix_name, fallback)


def _find_block(path: Path, matrix_name, fallback: bool):
    """(README text, the pattern of the block to replace, its markers), or the one-line error why there is none."""
    if not path.is_file():
        raise AttnlabError(f"README {path} is a folder, not a file" if path.is_dir() else f"README not found: {path}")
    text = path.read_text()
    candidates = ([markers(matrix_name)] if matrix_name else []) + ([markers()] if fallback or not matrix_name else [])
    for begin, end in candidates:
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            return text, pattern, (begin, end)
    raise AttnlabError(f"{path} has no block to replace: "
                       + " or ".join(f"'{begin}' ... '{end}'" for begin, end in candidates))
