"""``rtchat-server``'s JWT flags, each with an environment variable as its default.

Kept out of ``__main__`` so the command line reads as a list, and out of
``auth.py`` so PyJWT is imported only when a flag asks for it. A secret is
better given as ``RTCHAT_JWT_SECRET`` than on the command line, where every
user of the machine can read it (``ps``).
"""

from __future__ import annotations

import argparse
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .auth import JwtAuthenticator

__all__ = ["ENV", "add_jwt_flags", "jwt_authenticator"]

ENV = {
    "jwt_secret": "RTCHAT_JWT_SECRET",
    "jwt_public_key": "RTCHAT_JWT_PUBLIC_KEY",
    "jwt_audience": "RTCHAT_JWT_AUDIENCE",
    "jwt_issuer": "RTCHAT_JWT_ISSUER",
    "jwt_leeway": "RTCHAT_JWT_LEEWAY",
    "jwt_rooms_claim": "RTCHAT_JWT_ROOMS_CLAIM",
}
"""The environment variable behind each flag."""


def add_jwt_flags(parser: argparse.ArgumentParser) -> None:
    """The flags; each left out falls back to its variable (read when used, so
    ``--help`` never prints a secret)."""
    group = parser.add_argument_group(
        "authentication", "verify a JWT in each hello (auth.token or an Authorization header)"
    )
    flags = [
        ("--jwt-secret", "SECRET", "HS256 secret, at least 32 bytes"),
        ("--jwt-public-key", "FILE", "PEM public key for RS256/ES256 tokens"),
        ("--jwt-audience", "AUD", "required 'aud' claim (else not checked)"),
        ("--jwt-issuer", "ISS", "required 'iss' claim (else not checked)"),
        ("--jwt-leeway", "SECONDS", "clock skew allowed on exp and nbf (else 0)"),
        (
            "--jwt-rooms-claim",
            "NAME",
            "claim listing the rooms of / a token may join and"
            " publish to (names, or prefixes ending in *); others are forbidden",
        ),
    ]
    for flag, metavar, text in flags:
        env = ENV[flag[2:].replace("-", "_")]
        group.add_argument(flag, metavar=metavar, help=f"{text}; env {env}")


def _resolve(args: argparse.Namespace) -> None:
    for name, env in ENV.items():
        if getattr(args, name, None) is None:
            setattr(args, name, os.environ.get(env) or None)


def jwt_authenticator(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> JwtAuthenticator | None:
    """The authenticator the flags ask for, or None; a bad flag exits 2 (``parser.error``)."""
    _resolve(args)
    if args.jwt_secret is None and args.jwt_public_key is None:
        if args.jwt_audience is not None or args.jwt_issuer is not None:
            parser.error("--jwt-audience and --jwt-issuer need --jwt-secret or --jwt-public-key")
        if args.jwt_rooms_claim is not None:
            parser.error("--jwt-rooms-claim needs --jwt-secret or --jwt-public-key")
        return None
    if args.jwt_secret is not None and args.jwt_public_key is not None:
        parser.error("give --jwt-secret or --jwt-public-key, not both")
    try:
        leeway = float(args.jwt_leeway or 0)
    except ValueError:
        parser.error(f"--jwt-leeway must be a number of seconds, got {args.jwt_leeway!r}")
    if not math.isfinite(leeway) or leeway < 0:
        parser.error(f"--jwt-leeway must be >= 0, got {args.jwt_leeway!r}")
    try:
        from .auth import JwtAuthenticator
    except ImportError as exc:
        parser.error(f"JWT authentication needs PyJWT: pip install 'rtchat[jwt]' ({exc})")
    public_key: bytes | None = None
    if args.jwt_public_key is not None:
        try:
            with open(args.jwt_public_key, "rb") as f:
                public_key = f.read()
        except OSError as exc:
            parser.error(f"--jwt-public-key: cannot read {args.jwt_public_key}: {exc}")
    try:
        return JwtAuthenticator(
            secret=args.jwt_secret,
            public_key=public_key,
            audience=args.jwt_audience,
            issuer=args.jwt_issuer,
            leeway=leeway,
        )
    except ValueError as exc:
        flag = "--jwt-secret" if args.jwt_secret is not None else "--jwt-public-key"
        parser.error(f"{flag}: {exc}")
