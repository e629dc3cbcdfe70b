"""A built-in authenticator: JSON Web Tokens, verified with PyJWT.

``Server(authenticate=JwtAuthenticator(secret=...))`` (or ``rtchat-server
--jwt-secret``) takes the token a client sends in ``hello.auth.token`` (or in an
``Authorization: Bearer`` header), checks its signature, expiry (``exp``, which
is required), not-before (``nbf``), and, when configured, audience and issuer,
allowing ``leeway`` seconds of clock skew; the user is the ``sub`` claim. A
refusal says why (``CredentialsRefused``: the client is told in the 4001
reason). The claims go with the ``Identity`` (kept on the session for
authorization), and ``expires_in`` lets the hub close the connection once the
token is stale (4008, after ``ServerConfig.token_expiry_grace``).

This module imports PyJWT (``pip install 'rtchat[jwt]'``); ``import server_ref``
does not load it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jwt

from .core.commands import Identity
from .errors import CredentialsRefused

__all__ = ["JwtAuthenticator"]

_SYMMETRIC = ("HS256",)
_ASYMMETRIC = ("RS256", "ES256")


class JwtAuthenticator:
    """Verifies a JWT per hello: HS256 with ``secret``, or RS256/ES256 with ``public_key`` (PEM).

    Exactly one of ``secret`` and ``public_key``: the algorithms follow from it
    unless given, and never mix the two kinds (a public key used as an HMAC
    secret is the classic JWT forgery).
    """

    def __init__(
        self,
        *,
        secret: str | bytes | None = None,
        public_key: str | bytes | None = None,
        algorithms: Sequence[str] | None = None,
        audience: str | Sequence[str] | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (secret is None) == (public_key is None):
            raise ValueError("give exactly one of secret (HS256) and public_key (RS256/ES256)")
        allowed = _SYMMETRIC if secret is not None else _ASYMMETRIC
        chosen = tuple(algorithms) if algorithms is not None else allowed
        wrong = [a for a in chosen if a not in allowed]
        if not chosen or wrong:
            kind = "a secret" if secret is not None else "a public key"
            raise ValueError(f"with {kind} the algorithms are {list(allowed)}, got {list(chosen)}")
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and len(secret) < 32:
            raise ValueError("an HS256 secret needs at least 32 bytes (RFC 7518 §3.2)")
        if leeway < 0:
            raise ValueError(f"leeway must be >= 0, got {leeway!r}")
        self.algorithms = list(chosen)
        self.audience = audience if audience is None or isinstance(audience, str) else [*audience]
        self.issuer = issuer
        self.leeway = leeway
        self._clock = clock
        self._key: Any = secret
        if public_key is not None:
            self.algorithms = [a for a in chosen if _fits(public_key, a)]
            if not self.algorithms:
                raise ValueError(f"not a PEM public key for any of {list(chosen)}")
            self._key = public_key

    def verify(self, token: str) -> Identity:
        """The identity a token proves; raises ``CredentialsRefused`` saying why not."""
        now = self._clock()
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self.audience is not None,
                    "verify_iat": False,  # PyJWT reads its own clock for iat; nbf says enough
                    "verify_exp": False,  # checked below against our clock
                    "verify_nbf": False,
                },
            )
        except jwt.ExpiredSignatureError:
            raise CredentialsRefused("token expired") from None
        except jwt.ImmatureSignatureError:
            raise CredentialsRefused("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise CredentialsRefused("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise CredentialsRefused("token from another issuer") from None
        except jwt.InvalidSignatureError:
            raise CredentialsRefused("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise CredentialsRefused(f"token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise CredentialsRefused(f"invalid token: {exc}") from None
        exp, nbf, sub = claims["exp"], claims.get("nbf"), claims["sub"]
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise CredentialsRefused("token's 'exp' is not a number")
        if exp + self.leeway <= now:
            raise CredentialsRefused("token expired")
        if nbf is not None:
            if not isinstance(nbf, int | float) or isinstance(nbf, bool):
                raise CredentialsRefused("token's 'nbf' is not a number")
            if nbf - self.leeway > now:
                raise CredentialsRefused("token not yet valid")
        if not isinstance(sub, str) or not sub:
            raise CredentialsRefused("token's 'sub' is not a user name")
        return Identity(sub, claims, expires_in=exp - now)

    def __call__(self, auth: dict[str, Any] | None) -> Identity:
        """The server's authenticator hook: ``auth.token`` is the JWT."""
        token = (auth or {}).get("token")
        if not isinstance(token, str) or not token:
            raise CredentialsRefused("no token: send it in auth.token or as a Bearer header")
        return self.verify(token)


def _fits(public_key: str | bytes, algorithm: str) -> bool:
    """Whether the PEM key is one ``algorithm`` verifies with (RSA for RS256, EC for ES256)."""
    try:
        jwt.get_algorithm_by_name(algorithm).prepare_key(public_key)
    except (jwt.PyJWTError, ValueError, TypeError):
        return False
    return True
