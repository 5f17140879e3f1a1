import DmaBufCLI

#if canImport(Glibc)
import Glibc
#endif

// All of dmabufctl lives in DmaBufCLI; see `Dmabufctl` and its exit statuses (`ExitStatus`).
exit(Dmabufctl.execute(Array(CommandLine.arguments.dropFirst())))
