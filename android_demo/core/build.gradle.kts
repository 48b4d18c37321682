// Plain Kotlin (no Android): the chat logic the app's UI observes. Its tests need the golden
// prompts and a .litertlm from the Python side: `make test` runs them through
// tests/test_android_demo.py; from Gradle pass -Pgolden=… -Plitertlm=… -Ptflite=….
plugins {
    alias(libs.plugins.kotlin.jvm)
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    testImplementation(libs.junit)
    testImplementation(libs.kotlin.test.junit)
}

tasks.test {
    for (key in listOf("golden", "litertlm", "tflite")) {
        project.findProperty(key)?.let { systemProperty(key, it.toString()) }
    }
    if (!project.hasProperty("golden")) {
        systemProperty("golden", file("src/test/resources/golden_prompts.json").absolutePath)
    }
}
