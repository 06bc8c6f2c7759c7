"""The ukgpu command line."""
