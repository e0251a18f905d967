"""Generated protobuf messages of the CRI subset in cri.proto (see there to regenerate)."""
