import DmaBuf

#if canImport(Glibc)
import Glibc
#endif

// `dmabuf-device-tests [PREFIX...]` runs the suite (tests whose names start with a PREFIX);
// `dmabuf-device-tests --child ROLE ARGS...` is how tests start a second process.
let arguments = Array(CommandLine.arguments.dropFirst())
if arguments.first == "--child" {
    let role = arguments.dropFirst().first ?? ""
    let rest = Array(arguments.dropFirst(2))
    exit(role.hasPrefix("daemon-") ? DaemonChildren.run(role: role, arguments: rest) : Children.run(role: role, arguments: rest))
}
let suite = HeapTests.all + UDmabufTests.all + DmaBufferTests.all + FenceTests.all + PageRunTests.all
    + DaemonTests.all + LeaseTests.all
exit(Harness.main(tests: suite, filter: arguments))
