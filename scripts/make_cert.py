"""Make a self-signed certificate and key for development (not for production).

    python scripts/make_cert.py [--domain localhost] [--out certs]

Writes certs/<domain>.pem and certs/<domain>.key (the paths config.yaml names) with the
system's openssl; does nothing when both exist already.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domain", default="localhost")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "certs"))
    parser.add_argument("--force", action="store_true", help="replace an existing pair")
    args = parser.parse_args()
    out = Path(args.out)
    cert, key = out / f"{args.domain}.pem", out / f"{args.domain}.key"
    if cert.exists() and key.exists() and not args.force:
        print(f"{cert} and {key} exist; keeping them")
        return 0
    openssl = shutil.which("openssl")
    if openssl is None:
        print("error: openssl is not installed (apt-get install openssl)", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "825",
            "-subj",
            f"/CN={args.domain}",
            "-addext",
            f"subjectAltName=DNS:{args.domain},DNS:*.{args.domain}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    print(f"wrote {cert} and {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
