"""Command line (`vgpa`) and HTTP client. They reach the services over HTTP only."""
