"""ringd: run one language model across a ring of ordinary machines."""

__version__ = "0.1.0"

#: Version of the peer protocol (wire format, membership, plan agreement).
#: Peers with another protocol version are refused with a clear reason.
PROTOCOL_VERSION = 1
