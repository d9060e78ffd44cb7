from twisted.application.service import ServiceMaker

mgpumanager = ServiceMaker(
    "mgpumanager", "mgpumanager.app.tap", "GPU scheduler and proxy for local AI servers",
    "mgpumanager",
)
