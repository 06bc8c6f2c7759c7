"""PCI devices from sysfs and their configuration space."""
