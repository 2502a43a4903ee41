"""The configuration: records and metadata (model), reading (load), rendering (render),
extra mounts (mounts), agent groups (groups). Imports only contract and support."""
