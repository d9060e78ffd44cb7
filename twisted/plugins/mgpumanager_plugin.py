from twisted.application.service import ServiceMaker

mgpumanager = ServiceMaker(
    "mgpumanager", "mgpumanager.tap", "GPU scheduler and proxy for local AI servers", "mgpumanager"
)
