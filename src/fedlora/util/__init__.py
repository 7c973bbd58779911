"""Small helpers with no fedlora dependencies: JSON safety, thread settings, progress phases."""
