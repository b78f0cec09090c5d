"""Test doubles for what cannot run here: a stateful hosted·ai emulator and a replay provider that
serves recorded model answers. They speak the real wire protocols on loopback; the product's
connectors never import them."""
