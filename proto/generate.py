"""Regenerate the Python code for the .proto contracts: `python proto/generate.py`.

Runs grpc_tools.protoc with `proto/` as the include root (so the descriptors are named
`reward/v1/reward.proto`, as other languages see them) and rewrites the one import protoc
writes relative to that root into a package-absolute one (`from assay.proto.reward.v1 import ...`),
since `proto/` is installed as `assay.proto`. The output is committed and never edited by hand;
tests/rm_server/test_grpc.py checks it is what this script produces, for every contract.

    python proto/generate.py            # next to each .proto: proto/reward/v1/, proto/policy/v1/
    python proto/generate.py --out DIR  # into DIR/reward/v1/, ... (the up-to-date test compares the bytes)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
CONTRACTS = ["reward/v1/reward.proto", "policy/v1/policy.proto"]


def generate(proto: str, out: Path) -> list[Path]:
    """Generate `<name>_pb2.py`, `<name>_pb2.pyi` and `<name>_pb2_grpc.py` for one contract into `out`."""
    package = str(Path(proto).parent).replace("/", ".")  # reward.v1
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", proto]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / Path(proto).parent).glob("*_pb2*")):
            text = src.read_text()
            # protoc: `from reward.v1 import reward_pb2 as ...`; the package lives under `proto`.
            text = re.sub(
                rf"^from {re.escape(package)} import ", f"from assay.proto.{package} import ", text, flags=re.MULTILINE
            )
            dest = out / src.name
            dest.write_text(text)
            written.append(dest)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write under this folder instead of next to each .proto")
    args = parser.parse_args(argv)
    for proto in CONTRACTS:
        for path in generate(proto, (args.out or ROOT) / Path(proto).parent):
            print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
