"""The `longrope` command line: thin click commands over the library."""
