"""The library the commands share: it takes values (small dataclasses), never parsed flags. docs/layout.md
lists its modules."""
