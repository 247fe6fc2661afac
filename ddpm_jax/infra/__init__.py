"""What the library runs on: paths local or gs:// (`storage`), devices and
hosts (`parallel`), image files (`images`) and the CPU start-up settings
(`hugepages`, `cpu_flags`)."""
