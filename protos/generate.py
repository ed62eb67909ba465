"""Generate the Python modules and typed stubs for the protos under this folder.

Usage: python protos/generate.py OUT_DIR

Writes ``OUT_DIR/scanjobs/v1/scanjobs_pb2.py``, ``scanjobs_pb2_grpc.py`` and their ``.pyi``
stubs (mypy-protobuf), ``scanjobs_connect.py`` (the Connect / gRPC-Web service for the HTTP
port, over the same ``google.protobuf`` messages), plus the package markers. ``make proto``
runs it with ``gen``; a test runs it into a temporary folder and compares, so the committed
copy never drifts from the .proto.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

_HERE = Path(__file__).resolve().parent
_PACKAGE_MARKERS = ("scanjobs/__init__.py", "scanjobs/v1/__init__.py", "scanjobs/py.typed")


def generate(out_dir: Path) -> None:
    """Run protoc for every .proto below this folder into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p.relative_to(_HERE)) for p in _HERE.rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--plugin=protoc-gen-connectrpc={bin_dir / 'protoc-gen-connectrpc'}",
        f"-I{_HERE}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        f"--connectrpc_out={out_dir}",
        "--connectrpc_opt=protobuf=google",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for marker in _PACKAGE_MARKERS:
        (out_dir / marker).touch()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    generate(Path(sys.argv[1]))
