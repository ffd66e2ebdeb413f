"""pep: a transparent TCP split-connection Performance Enhancing Proxy."""
