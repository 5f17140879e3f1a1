import DmaBuf

#if canImport(Glibc)
import Glibc
#endif

// `dmabuf-device-tests [PREFIX...] [-PREFIX...]` runs the suite (tests whose names start with a PREFIX, less
// those starting with a -PREFIX);
// `dmabuf-device-tests --child ROLE ARGS...` is how tests start a second process.
let arguments = Array(CommandLine.arguments.dropFirst())
// Tests hold many buffers at once, one fd each: use every descriptor the hard limit allows.
var fileLimit = rlimit()
if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &fileLimit) == 0 {
    fileLimit.rlim_cur = fileLimit.rlim_max
    _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &fileLimit)
}
if arguments.first == "--bench" { exit(Bench.main(Array(arguments.dropFirst()))) }
if arguments.first == "--child", arguments.count > 1, arguments[1].hasPrefix("hostile-") { exit(HostileChildren.run(role: arguments[1], arguments: Array(arguments.dropFirst(2)))) }
if arguments.first == "--child", arguments.count > 1, arguments[1].hasPrefix("cgroup-") { exit(CgroupChargeChildren.run(role: arguments[1], arguments: Array(arguments.dropFirst(2)))) }
if arguments.first == "--child", arguments.count > 1, arguments[1].hasPrefix("fault-") { exit(FaultChildren.run(role: arguments[1], arguments: Array(arguments.dropFirst(2)))) }
if arguments.first == "--child" {
    let role = arguments.dropFirst().first ?? ""
    let rest = Array(arguments.dropFirst(2))
    exit(role.hasPrefix("daemon-") ? DaemonChildren.run(role: role, arguments: rest) : Children.run(role: role, arguments: rest))
}
let suite = HeapTests.all + UDmabufTests.all + DmaBufferTests.all + FenceTests.all + PageRunTests.all
    + DaemonTests.all + LeaseTests.all + CLITests.all + CMATests.all + FaultTests.all + LoadTests.all + HostileTests.all
    + CLibTests.all + CgroupTests.all + CgroupChargeTests.all
exit(Harness.main(tests: suite, filter: arguments))
