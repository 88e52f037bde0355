"""Message channels between cortex and neurons (see :mod:`.channel`)."""

from .channel import Channel, ChannelClosed, ConnectFailed, Screened, TransportError

__all__ = ["Channel", "ChannelClosed", "ConnectFailed", "Screened", "TransportError"]
