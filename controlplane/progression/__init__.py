"""Judging live metrics and moving releases forward on their own."""
