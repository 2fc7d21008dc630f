"""scripts/build-kube.sh mirrors the configured `deb` lines as `deb-src` (Debian 12 and 13)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-kube.sh"


def mirror(apt_etc: Path) -> list[str]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--print-sources"],
        env={"RUNBOOKS_APT_ETC": str(apt_etc), "PATH": "/usr/bin:/bin", "HOME": str(apt_etc)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.splitlines()


def test_deb822_and_one_line_sources(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://deb.debian.org/debian bookworm main contrib\n"
        "deb-src http://deb.debian.org/debian bookworm main\n"
    )
    (parts / "extra.list").write_text(
        "deb [arch=amd64 signed-by=/k.gpg] https://mirror.example/debian bookworm-backports main\n"
    )
    (parts / "debian.sources").write_text(
        "Types: deb\n"
        "# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://deb.debian.org/debian\n"
        "Suites: trixie trixie-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb deb-src\n"
        "URIs: http://security.example/debian-security\n"
        "Suites: trixie-security\n"
        "Components: main non-free-firmware\n"
        "Signed-By:\n"
        " -----BEGIN PGP PUBLIC KEY BLOCK-----\n"
        " Version: inline\n"
        " .\n"
        " -----END PGP PUBLIC KEY BLOCK-----\n"
        "\n"
        "Types: deb\n"
        "Enabled: no\n"
        "URIs: http://disabled.example/debian\n"
        "Suites: trixie\n"
        "Components: main\n"
    )
    (parts / "google.list.disabled-by-farm").write_text("deb https://ignored.example/apt x main\n")
    (parts / "sources-only.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: trixie\nComponents: main\n"
    )
    assert mirror(tmp_path) == [
        "deb-src http://deb.debian.org/debian bookworm main contrib",
        "deb-src [arch=amd64 signed-by=/k.gpg] "
        "https://mirror.example/debian bookworm-backports main",
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://deb.debian.org/debian trixie main",
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://deb.debian.org/debian trixie-updates main",
        "deb-src http://security.example/debian-security trixie-security main non-free-firmware",
    ]


def test_nothing_configured_builds_nothing(tmp_path: Path) -> None:
    assert mirror(tmp_path) == []
    # And the real run refuses with the reason instead of passing.
    out = subprocess.run(
        ["bash", str(SCRIPT)],
        env={
            "RUNBOOKS_APT_ETC": str(tmp_path),
            "RUNBOOKS_KUBE_CACHE": str(tmp_path / "cache"),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode != 0
    assert "build-kube: cannot build:" in out.stderr
