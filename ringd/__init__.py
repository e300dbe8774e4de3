"""ringd: run one language model across a ring of ordinary machines."""

__version__ = "0.1.0"

#: Version of the peer protocol (wire format, membership, plan agreement).
#: Peers with another protocol version are refused with a clear reason.
#: 2: membership records carry the protocol version and the node's metadata as opaque bytes
#: (a msgpack map with named keys, :mod:`ringd.core.ringmeta`) instead of positional fields.
PROTOCOL_VERSION = 2
