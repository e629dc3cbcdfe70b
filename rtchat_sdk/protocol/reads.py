"""What the read frames answer: presence, presence stats and history (PROTOCOL §7.5, §7.6).

These are the ``reply.data`` of ``presence``, ``presence_stats`` and
``history`` as pydantic models, shared by the server (which builds them) and
the client (which returns them to the app), and the payloads of the
server's ``$join`` / ``$leave`` entries.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .frames import MessageFrame, Since

__all__ = ["History", "Presence", "PresenceChange", "PresenceMember", "PresenceStats"]


class _Read(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PresenceMember(_Read):
    """One session in a room: who it speaks for, what client, since when."""

    session: str = Field(description="The session id (as in `message.sender`).")
    user: str | None = Field(description="The user the server's authenticator named, if any.")
    client: str | None = Field(description="The `hello.client` of its connection, if given.")
    joined_at: float = Field(description="When it joined the room: Unix time, seconds.")


class PresenceChange(PresenceMember):
    """The data of a ``$join`` or ``$leave`` entry of a room stream."""

    reason: str | None = Field(
        default=None,
        description="For `$leave`: 'left' (it left the room), 'closed' (its client said "
        "goodbye), 'disconnected' (no resume within the grace period) or 'expired'.",
    )


class Presence(_Read):
    """Who is in a room: the answer to ``presence``."""

    stream: str
    members: list[PresenceMember] = Field(description="Oldest member first.")


class PresenceStats(_Read):
    """How many are in a room."""

    stream: str
    sessions: int = Field(ge=0, description="Sessions in the room.")
    users: int = Field(
        ge=0, description="Distinct users among them (sessions without a user not counted)."
    )


class History(_Read):
    """A page of a room stream's kept entries, and where the stream stands."""

    stream: str
    epoch: str = Field(description="The stream's current epoch.")
    offset: int = Field(ge=0, description="The offset of the stream's newest entry (0: none).")
    gap: str | None = Field(
        default=None,
        description="Null, or why the page does not start where it was asked to: 'trimmed' "
        "(those entries are no longer kept) or 'epoch_changed' (`since` was of another epoch: "
        "the page starts in the current one).",
    )
    more: bool = Field(
        default=False,
        description="More kept entries lie beyond the page in its direction (the limit or "
        "the frame size cut it): ask again from its last entry.",
    )
    entries: list[MessageFrame] = Field(
        default_factory=list, description="Oldest first, or newest first when `reverse`."
    )

    @property
    def position(self) -> Since:
        """The stream's position when read: join here (``since``) to continue live."""
        return Since(epoch=self.epoch, offset=self.offset)

    @property
    def trimmed(self) -> bool:
        """Entries asked for are gone: the page starts later than asked."""
        return self.gap == "trimmed"
