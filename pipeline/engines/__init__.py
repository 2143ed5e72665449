"""Running a stage's tasks elsewhere: Ray."""
