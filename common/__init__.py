"""The ground floor's utilities, imported by every other package and importing none of them:
logging set-up (``common.log``), strict config files (``common.config``: TOML into typed, frozen
dataclasses, unknown keys refused) and atomic writes (``common.files``). No torch."""
